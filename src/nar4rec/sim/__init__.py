"""The ground-truth user simulator: a world of users and items, a logging policy, an oracle."""
