"""The HTTP front door (``dpcore serve --http-port``, extra ``dpcore[http]``).

An SGLang- and OpenAI-compatible HTTP server that turns each request into a client-SDK
request to the controller and answers with the rank's output, plus the endpoints routers
poll (health, server info, loads). Modules: :mod:`~dpcore.http.protocol` (request bodies),
:mod:`~dpcore.http.responses` (response bodies), :mod:`~dpcore.http.statuses` (errors and
rejections as HTTP answers), :mod:`~dpcore.http.link` (the connection
to the controller), :mod:`~dpcore.http.app` (the Starlette app), :mod:`~dpcore.http.server`
(CLI and uvicorn), :mod:`~dpcore.http.routers` (the real routers for interop tests).
Nothing here is imported by ``import dpcore``.
"""
