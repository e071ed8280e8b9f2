# libfreekv -- GNU Makefile.
#
#   make                 build/libfreekv.so.$(VERSION) (+ soname links) and build/libfreekv.a
#   make check           build and run the Check unit tests (fetches Check if needed)
#   make check-sanitize  the same with ASan + UBSan, in build-asan/
#   make demo            build and run examples/demo.c
#   make examples        build every examples/*.c
#   make bench           build every bench/*.c (and bench/*.cu with CUDA=1)
#   make install         PREFIX=/usr/local DESTDIR= LIBDIR= INCLUDEDIR=
#   make uninstall | clean | distclean | print-check-flags
#
# Options: CUDA=0|1 (default: 1 when nvcc is found), CUDA_HOME, CHECK_PREFIX,
# CFLAGS (default -O2 -g), LDFLAGS, NVCCFLAGS (default -O3), BUILD (default build).

.DEFAULT_GOAL := all
.DELETE_ON_ERROR:
.SUFFIXES:

# ---------------------------------------------------------------------------
# Version, read from the public header (never hard-coded here).
# ---------------------------------------------------------------------------

HEADER := include/freekv.h
fkv_version_field = $(shell awk '$$2 == "FKV_VERSION_$(1)" { print $$3; exit }' $(HEADER))
MAJOR := $(call fkv_version_field,MAJOR)
MINOR := $(call fkv_version_field,MINOR)
PATCH := $(call fkv_version_field,PATCH)
VERSION := $(MAJOR).$(MINOR).$(PATCH)
ifeq ($(shell echo '$(VERSION)' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+$$'),)
  $(error could not read FKV_VERSION_MAJOR/MINOR/PATCH from $(HEADER) (got '$(VERSION)'))
endif

SONAME   := libfreekv.so.$(MAJOR)
SO_REAL  := libfreekv.so.$(VERSION)

# ---------------------------------------------------------------------------
# Directories and tools
# ---------------------------------------------------------------------------

BUILD      ?= build
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
DESTDIR    ?=

AR         ?= ar
PKG_CONFIG ?= pkg-config
INSTALL    ?= install

# ---------------------------------------------------------------------------
# CUDA detection. CUDA_HOME defaults to the toolkit of the nvcc on PATH, else
# /usr/local/cuda. CUDA defaults to 1 when nvcc is found there.
# ---------------------------------------------------------------------------

NVCC_ON_PATH := $(shell command -v nvcc 2>/dev/null)
ifeq ($(origin CUDA_HOME),undefined)
  ifneq ($(NVCC_ON_PATH),)
    CUDA_HOME := $(abspath $(dir $(NVCC_ON_PATH))..)
  else
    CUDA_HOME := /usr/local/cuda
  endif
endif
ifeq ($(origin NVCC),undefined)
  NVCC := $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc) $(NVCC_ON_PATH))
endif
ifeq ($(origin CUDA),undefined)
  CUDA := $(if $(NVCC),1,0)
endif
ifeq ($(NVCC),)
  NVCC := nvcc
endif
ifneq ($(filter-out 0 1,$(CUDA)),)
  $(error CUDA must be 0 or 1, not '$(CUDA)')
endif
CUDA_LIBDIR ?= $(CUDA_HOME)/lib64

# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------

CFLAGS    ?= -O2 -g
NVCCFLAGS ?= -O3
NVCC_GENCODE ?= -gencode arch=compute_80,code=sm_80 \
                -gencode arch=compute_90,code=sm_90 \
                -gencode arch=compute_90,code=compute_90

SANITIZE ?= 0
ifeq ($(SANITIZE),1)
  SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer \
               -fno-sanitize-recover=all
else
  SAN_FLAGS :=
endif

FKV_CFLAGS := -std=c11 -Wall -Wextra -Werror -fPIC -fvisibility=hidden \
              -Iinclude -Ilib -Ikernels
DEPFLAGS    = -MMD -MP -MF $(@:.o=.d)

ifeq ($(CUDA),1)
  CUDA_CPPFLAGS := -DFKV_WITH_CUDA -I$(CUDA_HOME)/include
  # cudart is linked statically: libfreekv.so needs no libcudart at run time.
  # nvcc's host code needs the C++ runtime (static-init guards, personality).
  CUDA_LIBS     := -L$(CUDA_LIBDIR) -lcudart_static -ldl -lpthread -lrt -lstdc++
else
  CUDA_CPPFLAGS :=
  CUDA_LIBS     :=
endif

# Every C file (library, tests, examples, bench) is compiled with these.
ALL_CFLAGS  = $(CPPFLAGS) $(FKV_CFLAGS) $(CUDA_CPPFLAGS) $(SAN_FLAGS) $(CFLAGS) \
              $(EXTRA_CFLAGS)
ALL_NVCCFLAGS = -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden \
                -Iinclude -Ilib -Ikernels -DFKV_WITH_CUDA $(NVCC_GENCODE) \
                $(NVCCFLAGS)
ALL_LDFLAGS = $(SAN_FLAGS) $(LDFLAGS)
# System libraries needed by anything linking libfreekv (static or shared).
SYS_LIBS   := $(CUDA_LIBS) -lm -lpthread

# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------

LIB_C_ALL  := $(wildcard lib/*.c)
LIB_C_CUDA := $(foreach f,$(LIB_C_ALL),$(if $(findstring cuda,$(notdir $(f))),$(f)))
ifeq ($(CUDA),1)
  LIB_C    := $(LIB_C_ALL)
  LIB_CU   := $(wildcard kernels/*.cu)
else
  LIB_C    := $(filter-out $(LIB_C_CUDA),$(LIB_C_ALL))
  LIB_CU   :=
endif
LIB_OBJS   := $(LIB_C:%.c=$(BUILD)/%.o) $(LIB_CU:%.cu=$(BUILD)/%.cu.o)

TEST_SRCS  := $(wildcard tests/*.c)
TEST_OBJS  := $(TEST_SRCS:%.c=$(BUILD)/%.o)
TEST_BIN   := $(BUILD)/tests/freekv_tests

EXAMPLE_SRCS := $(wildcard examples/*.c)
EXAMPLE_OBJS := $(EXAMPLE_SRCS:%.c=$(BUILD)/%.o)
EXAMPLE_BINS := $(EXAMPLE_SRCS:examples/%.c=$(BUILD)/examples/%)

# bench/: every .c is one program, except the support files below, which
# every bench program links (and the unit tests, for bench/workload.h).
BENCH_SUPPORT_C := bench/bench.c bench/bench_data.c bench/workload_gen.c \
                   bench/workload_session.c bench/workload_measure.c
BENCH_SUPPORT_OBJS := $(BENCH_SUPPORT_C:%.c=$(BUILD)/%.o)
# The GEMM stand-ins need cuBLAS: the bench programs link them, the unit
# tests do not.
BENCH_GEMM_C   := bench/gemm_model.c
BENCH_GEMM_OBJ := $(BENCH_GEMM_C:%.c=$(BUILD)/%.o)
# bench/decode_*.c and bench/recall_*.c: the parts of bench/decode and
# bench/recall (bench/decode.h, bench/recall.h), each linked into its
# program only.
BENCH_DECODE_OBJS := $(patsubst %.c,$(BUILD)/%.o,$(wildcard bench/decode_*.c))
BENCH_RECALL_OBJS := $(patsubst %.c,$(BUILD)/%.o,$(wildcard bench/recall_*.c))
BENCH_PART_C      := $(wildcard bench/decode_*.c bench/recall_*.c)
BENCH_C    := $(filter-out $(BENCH_SUPPORT_C) $(BENCH_GEMM_C) $(BENCH_PART_C),$(wildcard bench/*.c))
BENCH_CU   := $(if $(filter 1,$(CUDA)),$(wildcard bench/*.cu))
BENCH_OBJS := $(BENCH_C:%.c=$(BUILD)/%.o) $(BENCH_CU:%.cu=$(BUILD)/%.cu.o) \
              $(BENCH_SUPPORT_OBJS) $(BENCH_GEMM_OBJ) $(BENCH_DECODE_OBJS) \
              $(BENCH_RECALL_OBJS)
BENCH_C_BINS  := $(BENCH_C:bench/%.c=$(BUILD)/bench/%)
BENCH_CU_BINS := $(BENCH_CU:bench/%.cu=$(BUILD)/bench/%)
# cuBLAS for the benchmarks' model stand-in. Static when the toolkit has the
# archives (the binary then needs no libcublas at run time), else shared with
# an rpath; either way a CUDA=1 benchmark starts on a machine without a GPU
# (and runs the CPU backend there). BENCH_CUBLAS=static|shared overrides.
ifeq ($(CUDA),1)
  BENCH_CUBLAS ?= $(if $(wildcard $(CUDA_LIBDIR)/libcublas_static.a),static,shared)
  ifeq ($(BENCH_CUBLAS),static)
    BENCH_LIBS := -L$(CUDA_LIBDIR) -lcublas_static -lcublasLt_static -lculibos
  else
    BENCH_LIBS := -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcublas
  endif
endif

# The llama engine (examples/llama/, docs/integration.md): one program,
# build/examples/llama. Its objects go to $(BUILD)/llama/ (the program's own
# path cannot also be a directory). OpenMP (-fopenmp) for the CPU path's
# matmuls and prefill attention, for this example only: the library stays
# free of it. LLAMA_ARCH (default -march=native, 512-bit vectors where the
# host has them) because the CPU path is
# only fast with the host's vector width; set LLAMA_ARCH= for a portable
# binary. With CUDA=1 examples/llama/*.cu and gpu_*.c join, with
# -DLLAMA_WITH_CUDA and cuBLAS.
LLAMA_ARCH   ?= -march=native -mprefer-vector-width=512
# NCCL (--tp, examples/llama/gpu_tp.c): with CUDA=1, on when nccl.h and
# libnccl are found under CUDA_HOME (or /usr); NCCL=0 turns it off.
ifeq ($(CUDA),1)
  NCCL_HOME ?= $(firstword $(foreach d,$(CUDA_HOME) /usr,$(if $(wildcard $(d)/include/nccl.h),$(d))))
  NCCL_LIBDIR ?= $(firstword $(foreach d,$(NCCL_HOME)/lib64 $(NCCL_HOME)/lib $(NCCL_HOME)/lib/x86_64-linux-gnu,$(if $(wildcard $(d)/libnccl.so*),$(d))))
  NCCL ?= $(if $(NCCL_LIBDIR),1,0)
else
  NCCL := 0
endif
LLAMA_NCCL_FLAGS := $(if $(filter 1,$(NCCL)),-DLLAMA_WITH_NCCL -I$(NCCL_HOME)/include)
# (A literal comma would end $(if)'s first branch: -Wl,-rpath goes through
# llama_comma.)
llama_comma := ,
LLAMA_NCCL_LIBS  := $(if $(filter 1,$(NCCL)),-L$(NCCL_LIBDIR) -Wl$(llama_comma)-rpath$(llama_comma)$(NCCL_LIBDIR) -lnccl)
LLAMA_CFLAGS := -O3 $(LLAMA_ARCH) -fopenmp -Iexamples/llama \
                $(if $(filter 1,$(CUDA)),-DLLAMA_WITH_CUDA) $(LLAMA_NCCL_FLAGS)
LLAMA_C_ALL  := $(wildcard examples/llama/*.c)
LLAMA_C      := $(if $(filter 1,$(CUDA)),$(LLAMA_C_ALL),$(filter-out examples/llama/gpu_%,$(LLAMA_C_ALL)))
LLAMA_CU     := $(if $(filter 1,$(CUDA)),$(wildcard examples/llama/*.cu))
LLAMA_OBJS   := $(LLAMA_C:examples/llama/%.c=$(BUILD)/llama/%.o) \
                $(LLAMA_CU:examples/llama/%.cu=$(BUILD)/llama/%.cu.o)
# What tests/test_llama.c links: the loader and the CPU path (no main, no
# CUDA), so that `make check` needs no GPU libraries.
LLAMA_TEST_OBJS := $(filter-out $(BUILD)/llama/main.o $(BUILD)/llama/gpu_%,$(filter %.o,$(LLAMA_C:examples/llama/%.c=$(BUILD)/llama/%.o)))
LLAMA_BIN    := $(BUILD)/examples/llama

STATIC_LIB := $(BUILD)/libfreekv.a
SHARED_LIB := $(BUILD)/$(SO_REAL)
SHARED_LINKS := $(BUILD)/$(SONAME) $(BUILD)/libfreekv.so
MAP_FILE   := lib/libfreekv.map

ALL_OBJS := $(LIB_OBJS) $(TEST_OBJS) $(EXAMPLE_OBJS) $(BENCH_OBJS) $(LLAMA_OBJS)

# ---------------------------------------------------------------------------
# Check (unit-test framework) discovery:
#   1. CHECK_PREFIX=dir given: dir/include, dir/lib/<multiarch>/libcheck.a or
#      dir/lib/libcheck.a (+ libsubunit.a beside it);
#   2. else pkg-config's check;
#   3. else scripts/fetch-check.sh unpacks Debian's packages into .deps/root
#      (no root install) and CHECK_PREFIX becomes .deps/root/usr.
# ---------------------------------------------------------------------------

CHECK_FETCH_DIR := .deps
CHECK_STAMP     :=
ifneq ($(strip $(CHECK_PREFIX)),)
  CHECK_FROM := prefix
else ifeq ($(shell $(PKG_CONFIG) --exists check 2>/dev/null && echo yes),yes)
  CHECK_FROM := pkg-config
else
  CHECK_FROM   := fetch
  CHECK_PREFIX := $(CHECK_FETCH_DIR)/root/usr
  CHECK_STAMP  := $(CHECK_FETCH_DIR)/root/.complete
endif

ifeq ($(CHECK_FROM),pkg-config)
  CHECK_CFLAGS := $(shell $(PKG_CONFIG) --cflags check)
  CHECK_PC_LIBS := $(shell $(PKG_CONFIG) --libs check)
  CHECK_PC_DIR  := $(shell $(PKG_CONFIG) --variable=libdir check)
  # The static archives where the install has them, as for CHECK_PREFIX: the
  # test binary then runs on a machine without Check (the GPU machines).
  ifneq ($(wildcard $(CHECK_PC_DIR)/libcheck.a),)
    CHECK_LIBS := $(CHECK_PC_DIR)/libcheck.a \
                  $(or $(wildcard $(CHECK_PC_DIR)/libsubunit.a),$(filter -lsubunit,$(CHECK_PC_LIBS))) \
                  -lm -lpthread -lrt
  else
    CHECK_LIBS := $(CHECK_PC_LIBS)
  endif
else
  MULTIARCH    := $(or $(shell $(CC) -print-multiarch 2>/dev/null),x86_64-linux-gnu)
  CHECK_CFLAGS := -I$(CHECK_PREFIX)/include
  # Recursive (=) and via $(shell): evaluated when the test binary is linked,
  # i.e. after a fetch has put the files there.
  CHECK_LIBDIR  = $(shell for d in $(CHECK_PREFIX)/lib/$(MULTIARCH) $(CHECK_PREFIX)/lib; do \
                    if [ -f "$$d/libcheck.a" ]; then echo "$$d"; break; fi; done)
  CHECK_LIBS    = $(if $(CHECK_LIBDIR),$(CHECK_LIBDIR)/libcheck.a \
                    $(shell [ -f "$(CHECK_LIBDIR)/libsubunit.a" ] && echo "$(CHECK_LIBDIR)/libsubunit.a") \
                    -lm -lpthread -lrt,$(error libcheck.a not found under $(CHECK_PREFIX)/lib/$(MULTIARCH) or $(CHECK_PREFIX)/lib))
endif

ifeq ($(SANITIZE),1)
  # protect_shadow_gap=0: without it the CUDA driver cannot map its memory
  # under ASan and cudaGetDeviceCount fails (checked on an H200).
  TEST_ENV := ASAN_OPTIONS=detect_leaks=1$(if $(filter 1,$(CUDA)),:protect_shadow_gap=0) \
              UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
              CK_TIMEOUT_MULTIPLIER=$(or $(CK_TIMEOUT_MULTIPLIER),4)
  # The sanitized variant only needs the static library.
  CHECK_LIB_DEPS := $(STATIC_LIB)
else
  TEST_ENV :=
  CHECK_LIB_DEPS := $(SHARED_LIB) $(SHARED_LINKS) $(STATIC_LIB)
endif

# ---------------------------------------------------------------------------
# Rebuild everything when the flags change (e.g. CUDA=0 -> CUDA=1).
# ---------------------------------------------------------------------------

FLAGS_STAMP := $(BUILD)/.flags
FLAGS_TEXT  := CC=$(CC) $(ALL_CFLAGS) | NVCC=$(if $(LIB_CU)$(BENCH_CU),$(NVCC) $(ALL_NVCCFLAGS)) \
               | CUDA=$(CUDA) | LIBS=$(SYS_LIBS) $(LDFLAGS) | LLAMA=$(LLAMA_CFLAGS)

# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------

.PHONY: all check check-sanitize demo examples bench install uninstall clean \
        distclean print-check-flags FORCE

all: $(SHARED_LIB) $(SHARED_LINKS) $(STATIC_LIB)

$(FLAGS_STAMP): FORCE
	@mkdir -p $(@D)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(strip $(FLAGS_TEXT))' ]; then \
	  printf '%s\n' '$(strip $(FLAGS_TEXT))' > $@; fi

$(BUILD)/%.o: %.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) $(DEPFLAGS) -c -o $@ $<

$(BUILD)/%.cu.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(NVCC) $(ALL_NVCCFLAGS) -MMD -MP -MF $(@:.o=.d) -c -o $@ $<

$(SHARED_LIB): $(LIB_OBJS) $(MAP_FILE)
	$(CC) -shared -o $@ $(LIB_OBJS) $(ALL_LDFLAGS) \
	  -Wl,--version-script=$(MAP_FILE) -Wl,-soname,$(SONAME) -Wl,--no-undefined \
	  $(SYS_LIBS)

$(BUILD)/$(SONAME): $(SHARED_LIB)
	ln -sf $(SO_REAL) $@

$(BUILD)/libfreekv.so: $(BUILD)/$(SONAME)
	ln -sf $(SONAME) $@

$(STATIC_LIB): $(LIB_OBJS)
	@rm -f $@
	$(AR) rcs $@ $(LIB_OBJS)

# --- tests ------------------------------------------------------------------

$(TEST_OBJS): EXTRA_CFLAGS = $(CHECK_CFLAGS)
$(TEST_OBJS): | $(CHECK_STAMP)

# tests/test_llama.c links the llama engine's loader and CPU path (OpenMP).
# tests/test_accuracy.c runs bench/workload.h's workloads (BENCH_SUPPORT_OBJS).
$(TEST_BIN): $(TEST_OBJS) $(LLAMA_TEST_OBJS) $(BENCH_SUPPORT_OBJS) $(STATIC_LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_LDFLAGS) -fopenmp -o $@ $(TEST_OBJS) $(LLAMA_TEST_OBJS) \
	  $(BENCH_SUPPORT_OBJS) $(STATIC_LIB) \
	  $(CHECK_LIBS) $(SYS_LIBS)

ifneq ($(CHECK_STAMP),)
$(CHECK_STAMP): scripts/fetch-check.sh
	sh scripts/fetch-check.sh $(CHECK_FETCH_DIR)
endif

# make check also replays the fuzz corpus (ASan + UBSan, CPU backend) and
# runs a short soak (CHECK_SOAK_STEPS) before the test suites; CI runs the
# long fuzz and soak besides. The sanitized variant runs the suites alone.
CHECK_SOAK_STEPS ?= 5000
check: $(CHECK_LIB_DEPS) $(TEST_BIN)
ifneq ($(SANITIZE),1)
	+$(MAKE) --no-print-directory fuzz-replay
	+$(MAKE) --no-print-directory soak SOAK_STEPS=$(CHECK_SOAK_STEPS)
endif
	$(TEST_ENV) $(TEST_BIN)

check-sanitize:
	$(MAKE) BUILD=build-asan SANITIZE=1 check

print-check-flags:
	@echo 'VERSION      = $(VERSION) (soname $(SONAME))'
	@echo 'CUDA         = $(CUDA) (CUDA_HOME=$(CUDA_HOME), NVCC=$(NVCC))'
	@echo 'CHECK_FROM   = $(CHECK_FROM)'
	@echo 'CHECK_PREFIX = $(CHECK_PREFIX)'
	@echo 'CHECK_CFLAGS = $(CHECK_CFLAGS)'
ifeq ($(CHECK_FROM),fetch)
	@echo 'CHECK_LIBS   = $(if $(wildcard $(CHECK_STAMP)),$(CHECK_LIBS),(after scripts/fetch-check.sh: $(CHECK_PREFIX)/lib/$(MULTIARCH)/libcheck.a libsubunit.a -lm -lpthread -lrt))'
else
	@echo 'CHECK_LIBS   = $(CHECK_LIBS)'
endif
	@echo 'SYS_LIBS     = $(SYS_LIBS)'

# --- examples ---------------------------------------------------------------

$(EXAMPLE_BINS): $(BUILD)/examples/%: $(BUILD)/examples/%.o $(STATIC_LIB)
	$(CC) $(ALL_LDFLAGS) -o $@ $< $(STATIC_LIB) $(SYS_LIBS)


$(BUILD)/llama/%.o: examples/llama/%.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) $(LLAMA_CFLAGS) $(DEPFLAGS) -c -o $@ $<

$(BUILD)/llama/%.cu.o: examples/llama/%.cu $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(NVCC) $(ALL_NVCCFLAGS) -DLLAMA_WITH_CUDA $(LLAMA_NCCL_FLAGS) -Iexamples/llama -MMD -MP -MF $(@:.o=.d) -c -o $@ $<

$(LLAMA_BIN): $(LLAMA_OBJS) $(STATIC_LIB)
	@mkdir -p $(@D)
	$(CC) $(ALL_LDFLAGS) -fopenmp -o $@ $(LLAMA_OBJS) $(STATIC_LIB) \
	  $(if $(LLAMA_CU),$(BENCH_LIBS)) $(LLAMA_NCCL_LIBS) $(SYS_LIBS)

examples: $(EXAMPLE_BINS) $(LLAMA_BIN)

demo: $(BUILD)/examples/demo
	$(BUILD)/examples/demo

# --- benchmarks (nothing to do when bench/ has no sources) ------------------
# Each bench/*.c (and bench/*.cu with CUDA=1) is one program, but for
# BENCH_SUPPORT_C (bench.c, bench_data.c, workload_*.c: the definitions of
# bench/bench.h and bench/workload.h) and BENCH_GEMM_C (gemm_model.c: the
# GEMM stand-ins of bench/gemm_model.h), which each program links, and
# bench/decode_*.c and bench/recall_*.c (those programs' parts); scripts
# (bench/*.py) are not built.
#   make bench         build them
#   make bench-smoke   build them and run each with --smoke (tiny sizes, CPU
#                      backend where there is no GPU; what CI runs)
# On a GPU machine: build/bench/decode --help.

BENCH_BINS := $(BENCH_C_BINS) $(BENCH_CU_BINS)

$(BENCH_C_BINS): $(BUILD)/bench/%: $(BUILD)/bench/%.o $(BENCH_SUPPORT_OBJS) $(BENCH_GEMM_OBJ) $(STATIC_LIB)
	$(CC) $(ALL_LDFLAGS) -o $@ $(filter %.o,$^) $(STATIC_LIB) $(BENCH_LIBS) $(SYS_LIBS)

$(BUILD)/bench/decode: $(BENCH_DECODE_OBJS)
$(BUILD)/bench/recall: $(BENCH_RECALL_OBJS)

$(BENCH_CU_BINS): $(BUILD)/bench/%: $(BUILD)/bench/%.cu.o $(BENCH_SUPPORT_OBJS) $(BENCH_GEMM_OBJ) $(STATIC_LIB)
	$(CC) $(LDFLAGS) -o $@ $< $(BENCH_SUPPORT_OBJS) $(BENCH_GEMM_OBJ) $(STATIC_LIB) \
	  $(BENCH_LIBS) $(SYS_LIBS)

bench: $(BENCH_BINS)
	@:

.PHONY: bench-smoke
bench-smoke: $(BENCH_BINS)
	@set -e; for b in $(BENCH_BINS); do \
	  echo "::: $$b --smoke"; $$b --smoke; done

# --- install ----------------------------------------------------------------

PC_PREFIX     := $(PREFIX)
PC_LIBDIR     := $(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))
PC_INCLUDEDIR := $(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))

$(BUILD)/freekv.pc: freekv.pc.in FORCE
	@mkdir -p $(@D)
	@sed -e 's|@PREFIX@|$(PC_PREFIX)|g' \
	    -e 's|@LIBDIR@|$(PC_LIBDIR)|g' \
	    -e 's|@INCLUDEDIR@|$(PC_INCLUDEDIR)|g' \
	    -e 's|@VERSION@|$(VERSION)|g' \
	    -e 's|@LIBS_PRIVATE@|$(strip $(SYS_LIBS))|g' \
	    freekv.pc.in > $@.tmp
	@if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv -f $@.tmp $@; fi

install: all $(BUILD)/freekv.pc
	$(INSTALL) -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL) -m 644 include/freekv.h $(DESTDIR)$(INCLUDEDIR)/freekv.h
	$(INSTALL) -m 755 $(SHARED_LIB) $(DESTDIR)$(LIBDIR)/$(SO_REAL)
	ln -sf $(SO_REAL) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libfreekv.so
	$(INSTALL) -m 644 $(STATIC_LIB) $(DESTDIR)$(LIBDIR)/libfreekv.a
	$(INSTALL) -m 644 $(BUILD)/freekv.pc $(DESTDIR)$(PKGCONFIGDIR)/freekv.pc

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/freekv.h
	rm -f $(DESTDIR)$(LIBDIR)/$(SO_REAL) $(DESTDIR)$(LIBDIR)/$(SONAME) \
	      $(DESTDIR)$(LIBDIR)/libfreekv.so $(DESTDIR)$(LIBDIR)/libfreekv.a
	rm -f $(DESTDIR)$(PKGCONFIGDIR)/freekv.pc

clean:
	rm -rf $(BUILD) build build-asan

# Also drops the Check copy fetched by scripts/fetch-check.sh.
distclean: clean
	rm -rf $(CHECK_FETCH_DIR)

# ===========================================================================
# Fuzzing and soak (tests/fuzz/, tests/soak/). `make check` runs the corpus
# replay and a short soak; the rest is here.
#
#   make fuzz [FUZZ_TIME=60]  libFuzzer target tests/fuzz/fuzz_calls.c under
#                             ASan + UBSan, built with clang in build/fuzz/
#                             (CPU backend; CUDA=0 unless FUZZ_CUDA=1). It
#                             first replays tests/fuzz/corpus, then fuzzes
#                             for FUZZ_TIME seconds, growing build/fuzz/corpus
#                             (the tree's corpus is only read). Without a
#                             clang that links -fsanitize=fuzzer it falls
#                             back to `make fuzz-replay`.
#   make fuzz-replay          the same target as a plain program (any CC,
#                             ASan + UBSan) run once over tests/fuzz/corpus
#   make fuzz-merge           add to tests/fuzz/corpus (to commit) the inputs
#                             of build/fuzz/corpus that reach new edges
#                             (-use_counters=0: edges only, which keeps it to
#                             tens of files, not hundreds)
#   make soak [SOAK_STEPS=20000]  tests/soak/soak.c: continuous batching for
#                             SOAK_STEPS decode steps, asserting flat memory
# ===========================================================================

FUZZ_CC      ?= clang
FUZZ_HARNESS_CFLAGS ?=
FUZZ_TIME    ?= 60
FUZZ_MAX_LEN ?= 512
FUZZ_CUDA    ?= 0
FUZZ_BUILD   ?= build/fuzz
FUZZ_CORPUS  := tests/fuzz/corpus
FUZZ_ARGS    ?=
# protect_shadow_gap=0 as for check-sanitize when the CUDA code is linked.
FUZZ_ENV     := ASAN_OPTIONS=detect_leaks=1$(if $(filter 1,$(FUZZ_CUDA)),:protect_shadow_gap=0) \
                UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

FUZZ_OBJ        := $(BUILD)/tests/fuzz/fuzz_calls.o
FUZZ_REPLAY_OBJ := $(BUILD)/tests/fuzz/fuzz_calls_replay.o
FUZZ_REF_OBJ    := $(BUILD)/tests/fuzz/reference.o
FUZZ_BIN        := $(BUILD)/tests/fuzz/fuzz_calls
FUZZ_REPLAY_BIN := $(BUILD)/tests/fuzz/fuzz_calls_replay
SOAK_OBJ        := $(BUILD)/tests/soak/soak.o
SOAK_BIN        := $(BUILD)/tests/soak/soak
SOAK_STEPS      ?= 20000
SOAK_ARGS       ?=

$(FUZZ_OBJ) $(FUZZ_REPLAY_OBJ) $(FUZZ_REF_OBJ) $(SOAK_OBJ): EXTRA_CFLAGS = -Itests \
  $(FUZZ_HARNESS_CFLAGS)

$(FUZZ_REPLAY_OBJ): tests/fuzz/fuzz_calls.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -DFKV_FUZZ_REPLAY $(DEPFLAGS) -c -o $@ $<

# The reference is the unit tests' (tests/reference.c), compiled here without
# Check's flags so that fuzzing and soak need no Check.
$(FUZZ_REF_OBJ): tests/reference.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) $(DEPFLAGS) -c -o $@ $<

$(FUZZ_BIN): $(FUZZ_OBJ) $(FUZZ_REF_OBJ) $(STATIC_LIB)
	$(CC) $(ALL_LDFLAGS) -fsanitize=fuzzer -o $@ $(FUZZ_OBJ) $(FUZZ_REF_OBJ) \
	  $(STATIC_LIB) $(SYS_LIBS)

$(FUZZ_REPLAY_BIN): $(FUZZ_REPLAY_OBJ) $(FUZZ_REF_OBJ) $(STATIC_LIB)
	$(CC) $(ALL_LDFLAGS) -o $@ $(FUZZ_REPLAY_OBJ) $(FUZZ_REF_OBJ) \
	  $(STATIC_LIB) $(SYS_LIBS)

$(SOAK_BIN): $(SOAK_OBJ) $(FUZZ_REF_OBJ) $(STATIC_LIB)
	$(CC) $(ALL_LDFLAGS) -o $@ $(SOAK_OBJ) $(FUZZ_REF_OBJ) $(STATIC_LIB) \
	  $(SYS_LIBS)

.PHONY: fuzz fuzz-replay fuzz-merge soak fuzz-build-bin fuzz-run-bin \
        fuzz-replay-bin

# Whether $(FUZZ_CC) links a libFuzzer program (clang with compiler-rt).
FUZZ_HAVE_LIBFUZZER = $(shell printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' | \
    $(FUZZ_CC) -x c -fsanitize=fuzzer,address,undefined -o /dev/null - >/dev/null 2>&1 && echo yes)

# Coverage instrumentation for the library and the target; the sanitizers
# come from SANITIZE=1.
# The harness and the reference keep edge coverage but not comparison
# tracing, which only slowed their loops (about a quarter of the time).
FUZZ_SUBMAKE = $(MAKE) BUILD=$(FUZZ_BUILD) CC=$(FUZZ_CC) SANITIZE=1 \
               CUDA=$(FUZZ_CUDA) CFLAGS="-O1 -g -fsanitize=fuzzer-no-link" \
               FUZZ_HARNESS_CFLAGS=-fno-sanitize-coverage=trace-cmp

fuzz:
ifeq ($(FUZZ_HAVE_LIBFUZZER),yes)
	+$(FUZZ_SUBMAKE) fuzz-run-bin
else
	@echo "fuzz: $(FUZZ_CC) cannot link -fsanitize=fuzzer (install clang and" \
	  "libclang-rt-14-dev); replaying the corpus instead"
	+$(MAKE) fuzz-replay
endif

fuzz-run-bin: $(FUZZ_BIN)
	@mkdir -p $(BUILD)/corpus $(BUILD)/artifacts
	$(FUZZ_ENV) $(FUZZ_BIN) -max_total_time=$(FUZZ_TIME) \
	  -max_len=$(FUZZ_MAX_LEN) -timeout=20 -rss_limit_mb=2048 \
	  -print_final_stats=1 -artifact_prefix=$(BUILD)/artifacts/ $(FUZZ_ARGS) \
	  $(BUILD)/corpus $(FUZZ_CORPUS) || { \
	  for f in $(BUILD)/artifacts/*; do [ -f "$$f" ] || continue; \
	    echo "fuzz: reproducer $$f (bytes in hex):"; od -An -tx1 -v "$$f"; done; \
	  exit 1; }

fuzz-replay:
	$(MAKE) BUILD=$(FUZZ_BUILD)-replay SANITIZE=1 CUDA=$(FUZZ_CUDA) fuzz-replay-bin

fuzz-replay-bin: $(FUZZ_REPLAY_BIN)
	$(FUZZ_ENV) $(FUZZ_REPLAY_BIN) $(FUZZ_CORPUS)

fuzz-merge:
	+$(FUZZ_SUBMAKE) $(FUZZ_BUILD)/tests/fuzz/fuzz_calls
	@mkdir -p $(FUZZ_BUILD)/corpus
	$(FUZZ_ENV) $(FUZZ_BUILD)/tests/fuzz/fuzz_calls -merge=1 -use_counters=0 \
	  -max_len=$(FUZZ_MAX_LEN) $(FUZZ_CORPUS) $(FUZZ_BUILD)/corpus

soak: $(SOAK_BIN)
	$(SOAK_BIN) --steps $(SOAK_STEPS) $(SOAK_ARGS)

-include $(FUZZ_OBJ:.o=.d) $(FUZZ_REPLAY_OBJ:.o=.d) $(FUZZ_REF_OBJ:.o=.d) \
         $(SOAK_OBJ:.o=.d)

# ===========================================================================

# ---------------------------------------------------------------------------

FORCE:

-include $(ALL_OBJS:.o=.d)
