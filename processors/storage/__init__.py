"""citytel's database: versioned migrations and the schema they build."""
