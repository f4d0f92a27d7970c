# Sourced by scripts/setup.sh and scripts/test.sh: the Python package's build
# (pip, build-py/) and the test build (build/) compile the library's files alike,
# so that the second takes them from ccache (CMake compiles through ccache when it
# finds it). ccache must see the same compiler name (pip's build asks for g++;
# CMake alone would pick c++) and paths relative to the repository.
CXX=${CXX:-g++}
CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
export CXX CCACHE_BASEDIR CCACHE_NOHASHDIR
