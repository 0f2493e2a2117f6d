"""The application layer: wires the layers into the node, batch conversion and the demo.

Nothing below ``app`` imports it.  ``node`` (lifecycle: SCP, scheduler, workers,
delivery, retention), ``worker`` (the job loop and worker processes), ``processor`` (one
study through a pipeline to result files), ``batch`` (a folder in, results out), ``demo``.
"""
