"""OGC SensorThings API 1.1, read side, under ``/sta/v1.1`` (docs/open-data.md).

``odata`` parses the query options (a lark grammar), ``evaluate`` gives them meaning,
``model`` maps the store onto Things, Datastreams, Observations and the rest, ``query``
pages collections (Observations lazily from the store) and ``routes`` serves them.
"""

from analytics.api.sta.routes import PREFIX, install

__all__ = ["PREFIX", "install"]
