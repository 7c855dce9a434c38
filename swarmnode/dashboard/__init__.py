"""``swarmnode dashboard``: one read-only page for a training, from the chain (what ``swarmnode
status`` shows) and the nodes' Prometheus metrics where reachable.

- :mod:`~swarmnode.dashboard.state`: the JSON the page shows (``/api/status``);
- :mod:`~swarmnode.dashboard.scrape`: reading the nodes' metrics ports;
- :mod:`~swarmnode.dashboard.server`: the HTTP server (standard library, read-only);
- :mod:`~swarmnode.dashboard.page`: the page itself (HTML, CSS, script; nothing fetched from
  elsewhere).
"""
