"""Tools built on the library: the ``mass`` command line (:mod:`mass.tools.cli`), the benchmarks
(:mod:`mass.tools.bench`), the offline demo (:mod:`mass.tools.demo`) and their shared timing, memory and
provenance helpers (:mod:`mass.tools.common`). The top wing: it may import everything, and nothing in the
library imports it. Inside it, the CLI may import the benchmarks and the demo; they import only ``common``
and the library."""
