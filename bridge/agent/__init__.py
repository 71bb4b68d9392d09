"""Device-side agents: programs that run beside a battery monitor and feed a batmon server.

Independent of the server: they share only the reading models, topic names and the
agent's own queue in bridge/store/, never the core or the broker.
"""
