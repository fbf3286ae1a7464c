// The CPU kernels in at::vec's portable form (any CPU): compiled with the base flags.
#define SCE_ISA_NS isa_default
#define SCE_ISA_TABLE kernels_default
#define SCE_ISA_NAME "default"
#include "kernels_impl.h"
