"""Speed and memory measurements. A regular package, so that `benchmarks.timing` is found here
before the top-level `benchmarks` package that opacus installs into site-packages."""
