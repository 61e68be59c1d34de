"""Teachers' networks: analytic teachers, built-in small networks, and loading from disk."""
