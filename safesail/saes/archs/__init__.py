"""One module per SAE architecture; each registers its class with `@register_arch` (safesail.saes.registry)."""
