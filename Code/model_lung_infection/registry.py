"""Name -> constructor registries, so scripts pick models and encoders by name (timm style)."""


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, name=None):
        def wrap(fn):
            key = name or fn.__name__
            if key in self._entries:
                raise KeyError(f"{self.kind} '{key}' registered twice")
            self._entries[key] = fn
            return fn
        return wrap

    def get(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._entries))}") from None

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries


MODELS = Registry("model")
ENCODERS = Registry("encoder")


def create_model(name, **kwargs):
    """Build a registered model by name, e.g. `create_model('inf_net', backbone='resnet50')`."""
    return MODELS.get(name)(**kwargs)


def list_models():
    return MODELS.names()
