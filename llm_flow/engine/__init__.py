"""The contribution engine: pure tensor math from a model run to the flow graph and its routes.

``contributions`` (proximities, ALTI-style shares) and ``kernels`` (the fused CPU kernel) are
pure functions of tensors; ``graph`` turns a :class:`~llm_flow.models.ModelRun` into a dense
:class:`~llm_flow.engine.graph.FlowGraph`; ``trace`` runs a model and builds the graph in one
pass; ``routes`` prunes it at a threshold. ``nodes`` names the graph's nodes and edges.
See docs/architecture.md.
"""
