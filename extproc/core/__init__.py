"""The sans-IO ext_proc core: no sockets, threads, gRPC channels or HTTP parsers here."""
