"""What crosses the library's boundary: prompt files in, routes out (the CLI's JSON contract,
networkx, GraphML, and the plotly figure of a route). See docs/architecture.md.
"""
