"""The agents that run beside splitd on other machines: `host` (the application
host: attach volumes, freeze, split, thaw)."""
