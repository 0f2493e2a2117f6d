"""The node's HTTP port: health and metrics, and (as they land) DICOMweb and the web pages.

Starlette on uvicorn.  Everything here reads through the table owners (``spool.index``,
``jobs.store``, ``delivery.store``); nothing below ``web`` imports it, and only ``app``
starts it.
"""
