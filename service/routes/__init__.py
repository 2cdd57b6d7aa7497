"""The API's routers, one per resource: jobs, their models, health, and the
dashboard page with its Prometheus endpoint."""
