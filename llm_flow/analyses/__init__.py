"""Analyses of a trace: logit lens, target-vs-distractor contrast, interventions (ablation),
faithfulness of a route, dataset mode and route diffs. Each takes a
:class:`~llm_flow.engine.trace.Trace` (what the app caches) and never re-runs what it holds.
See docs/architecture.md.
"""
