"""``edge-proxy demo``: model server + proxy + load on one machine, the five metrics shown live.
The subcommand is :mod:`.command`; :mod:`.cache` owns the on-disk cache of synthesized and adapted
models, :mod:`.measured` the measured quality and adaptation inputs. The demo only drives the
proxy from outside (subprocesses, HTTP, /metrics): it must not import the proxy's internals
(only :class:`edge_proxy.config.ConfigError`, for one-line errors)."""
