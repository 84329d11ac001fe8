"""The HTTP layer: `create_app` and its lifespan, one controller per resource, the HTML pages and
chart, auth, and live-log streaming. Handlers translate between HTTP and the layers below."""
