"""Pure tensor math of pml_ext: no classes with state, no PML modules constructed here."""
from .compiled import compiled_available
from .embedding_expansion import *  # noqa: F401,F403
from .embedding_expansion import __all__ as _ee_all
from .embedding_expansion_groups import *  # noqa: F401,F403
from .embedding_expansion_groups import __all__ as _groups_all
from .embedding_expansion_rows import *  # noqa: F401,F403
from .embedding_expansion_rows import __all__ as _rows_all
from .hardness_aware import *  # noqa: F401,F403
from .hardness_aware import __all__ as _hdml_all
from .hardness_aware_tuples import *  # noqa: F401,F403
from .hardness_aware_tuples import __all__ as _hdml_tuples_all

__all__ = ["compiled_available"] + list(_ee_all) + list(_groups_all) + list(_rows_all) + list(_hdml_all) + list(_hdml_tuples_all)
