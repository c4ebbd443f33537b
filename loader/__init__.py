"""azaion-loader: unlocks Azaion's encrypted Docker images and serves encrypted resources."""

__version__ = "0.1.0"
