"""Long-running services, each module named after the ``nettwin`` command it runs."""
