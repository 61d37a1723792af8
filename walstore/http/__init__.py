"""The HTTP/1.1 API: ``parser`` (sans-IO requests), ``server`` (the parser on trio sockets),
``validation`` (pure), ``app`` (routes).

The node builds ``HttpApp(service, metrics=...)`` and runs ``serve_http(app, host=...,
port=..., limits=HttpLimits(...), shutdown=event)`` in its nursery.
"""

from walstore.http.app import HttpApp
from walstore.http.server import HttpLimits, HttpServer, Request, Response, serve_http

__all__ = ["HttpApp", "HttpLimits", "HttpServer", "Request", "Response", "serve_http"]
