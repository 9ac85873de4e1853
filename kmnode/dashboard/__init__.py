"""`kmctl dashboard`: a live, read-only page of a running cluster.

A small aiohttp server polls every node's open routes (``/v1/status`` and ``/metrics``), never
an enclave, and subscribes to the cluster's audit topic on MQTT; the page asks it for one JSON
view of the cluster about once a second. Everything shown is what any scraper may read, so the
page holds nothing secret and offers no action.

* ``model``: the pure aggregation: samples of each node in, one view of the cluster out (rates
  from two polls, the link graph, down nodes).
* ``poll``: one round of requests to every node.
* ``audit``: the last audit records from MQTT.
* ``server``: the page, its JSON view, and the loop that keeps the view fresh.
"""
