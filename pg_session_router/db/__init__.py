"""The router core: topology, routing decision, unit of work, health, retry, tenancy,
consistency and migrations. No web framework and no application models."""
