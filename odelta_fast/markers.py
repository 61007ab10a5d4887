"""Names of the attributes this package writes onto objects it does not own. Kept in one place,
at the bottom of the import graph, because code on every floor reads them."""

# Class attribute of every delta module: addressing never selects a delta or what is inside one
# (an adapter's own Linear layers are not the backbone's), so attach order does not change what
# a spec selects.
DELTA_MARKER = "_odelta_is_delta"
# On each parameter of a delta: the name of the delta it belongs to.
DELTA_PARAM_ATTR = "_odelta_delta_name"
# In the backbone's ``__dict__``: ``{name: delta}`` of the deltas attached to it.
REGISTRY_ATTR = "_odelta_deltas"
