"""The benchmark suite of azaion-loader: ``python bench/run.py --help``."""
