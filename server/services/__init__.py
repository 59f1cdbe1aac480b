"""The rules of each resource, apart from HTTP: what may be created, changed or read, and by whom.

`server/api/` handlers parse the request, call a service and render its answer; the CLI's SSH front
door and the controllers may call the same services.
"""
