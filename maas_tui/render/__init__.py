"""Renderers shared by the CLI and the TUI: one module per resource kind says its columns, its cells, its
describe page and its kubectl-style document, so `maas ... list|describe` and `maas tui` never disagree on
columns or wording. Pure: Rich renderables and plain data, no Textual, no I/O.
"""
