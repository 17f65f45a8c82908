"""Layer 2, data: the prompts a study reads.

`nq` (NQ-open questions with their gold passages, the multi-document prompt and its spans,
sizes and splits), `tasks` (the long-context tasks). The files beside these modules are the
package's shipped data (the NQ sample, the paper's released directions).
"""
