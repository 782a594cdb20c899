"""Integrations with other libraries. Each submodule imports its library lazily, at use."""
