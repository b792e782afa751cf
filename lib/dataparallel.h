// lib/dataparallel.h: data parallelism over MPI ranks (DataParallel, dp_*): one allreduce of the
// trainable gradients per step. Compiled to a single process without -DUSE_MPI.
// Not a standalone header: the trainer includes it after the model.
#pragma once

#ifdef USE_MPI
#define OMPI_SKIP_MPICXX 1 // the C API only: no deprecated C++ bindings
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#include "utils.h" // die

// Data parallelism over MPI ranks (compiled in with -DUSE_MPI, which make sets when it finds mpicxx).
// Every rank holds the whole model and reads its own slice of each global batch (see the data loader).
// Each rank's loss is the mean over its B*T positions, so the mean over ranks of their gradients is the
// gradient of the mean over all B*world*T positions: what one process with batch B*world computes, up
// to fp32 summation order. After backward one MPI_Allreduce sums the trainable gradients (one flat
// buffer, in place) and every rank divides by world; every rank then applies the same AdamW step to
// the same gradient, so the weights stay identical on all ranks and are never sent. With LoRA that is
// a few MB a step, not the base model. Only rank 0 logs, samples and writes files.
// A rank that dies takes the job down: MPI_ERRORS_ARE_FATAL aborts on a failed call, and mpirun kills
// the remaining ranks as soon as one exits abnormally, so nobody waits forever in an allreduce.

struct DataParallel {
    int rank = 0, world = 1;       // this process and the number of processes: 0 and 1 without MPI
    double allreduce_ms = 0;       // wall time of the last gradient allreduce (includes waiting for the slowest rank)
    size_t allreduce_bytes = 0;    // bytes of gradient each rank contributes per step
};

static void dp_init(DataParallel* dp, int* argc, char*** argv) {
#ifdef USE_MPI
    MPI_Init(argc, argv);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL); // MPI's default, made explicit
    MPI_Comm_rank(MPI_COMM_WORLD, &dp->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &dp->world);
    // ranks other than 0 stay silent on stdout; their errors still reach stderr
    if (dp->rank != 0 && freopen("/dev/null", "w", stdout) == NULL) die("rank: cannot redirect stdout to /dev/null\n---> HINT: /dev/null must be writable for the ranks other than 0 (check the container or chroot)");
#else
    // launched by mpirun but built without MPI: every process would train alone on the same data
    const char* n = getenv("OMPI_COMM_WORLD_SIZE") ? getenv("OMPI_COMM_WORLD_SIZE") : getenv("PMI_SIZE");
    if (n != NULL && atoi(n) > 1) {
        die(strprintf("started as one of %s MPI processes, but this train_gpt2_lora was built without MPI\n"
                      "---> HINT: install an MPI (apt-get install libopenmpi-dev openmpi-bin) and rebuild with make", n));
    }
#endif
}

// in place: x = mean over ranks of x, with one MPI_Allreduce
static void dp_average(DataParallel* dp, float* x, size_t n) {
#ifdef USE_MPI
    if (dp->world == 1) return;
    if (n > (size_t)INT32_MAX) die(strprintf("cannot allreduce %zu floats in one call (MPI counts are int)\n---> HINT: the trainable parameters are too many for one MPI call: use LoRA (no -f 1) or a smaller model (-e)", n));
    double t0 = MPI_Wtime();
    MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (size_t i = 0; i < n; i++) { x[i] /= dp->world; }
    dp->allreduce_ms = (MPI_Wtime() - t0) * 1000.0;
    dp->allreduce_bytes = n * sizeof(float);
#endif
}

// the gradients of what is trainable: the adapters, or with -f every base parameter (main trains one or the other)
static void dp_average_gradients(DataParallel* dp, GPT2<float>* model) {
    if (dp->world == 1) return;
    float* grads = model->train_base ? model->grads_memory : model->lora.grads_memory;
    size_t n = model->train_base ? model->num_parameters : model->lora.num_parameters;
    // any other trainable buffer would silently differ between ranks: refuse instead
    if (n != gpt2_trainable_parameters(model)) {
        die("data parallel (mpirun) averages the gradients of LoRA or of full fine-tuning (-f 1) only, and this run trains other parameters\n"
            "---> HINT: run this method in one process, without mpirun");
    }
    dp_average(dp, grads, n);
}

// mean over ranks of one number (a loss), in double
static float dp_mean(const DataParallel* dp, float x) {
    double v = x;
#ifdef USE_MPI
    if (dp->world > 1) MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
#endif
    return (float)(v / dp->world);
}

static void dp_finalize() {
#ifdef USE_MPI
    MPI_Finalize();
#endif
}
