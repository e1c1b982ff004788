"""The router: clusters, nodes, tenants and the sessions bound to them."""
