"""`maas tui`: the Textual terminal UI (screens, widgets, one stylesheet).

The app never does blocking I/O on its thread: the watch stream, log streams and every
API call run as Textual workers on the app's event loop through `maas_tui.client`.
"""
