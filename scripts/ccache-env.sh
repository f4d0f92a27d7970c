# Sourced by scripts/setup.sh and scripts/test.sh: ccache (when CMake finds it, it
# compiles through it) sees paths relative to the repository, so the Python
# package's build (build-py/) and the test build (build/) share cached objects.
CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
export CCACHE_BASEDIR CCACHE_NOHASHDIR
