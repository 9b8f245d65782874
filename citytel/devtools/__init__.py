"""Development tools, not the product: the local stack, the simulated city, the benchmarks and
the detector evaluation. A runtime image leaves this package out; the ``citytel`` command then
simply has none of its subcommands. Nothing outside this package imports it."""
