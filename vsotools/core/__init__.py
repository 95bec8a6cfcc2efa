"""The ground floor: recipes, record schema, text and image rules, metrics, errors and files."""
