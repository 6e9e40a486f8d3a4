"""The retrieval service: an HTTP API and a web page over a :class:`cirlab.retrieval.search.Searcher`."""
