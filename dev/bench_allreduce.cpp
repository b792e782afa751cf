// dev/bench_allreduce.cpp: the cost of the one MPI_Allreduce a data-parallel step does, without the
// training around it (no load imbalance): n floats summed in place across ranks, as dp_average does.
// Default n = the trainable parameters of GPT-2 124M with LoRA r=8 on qkv,attproj,fc,fcproj, computed
// with the trainer's own lora_count_parameters.
//
//   mpicxx -O3 -std=c++17 -DUSE_MPI dev/bench_allreduce.cpp -o build/bench_allreduce
//   mpirun -np 2 ./build/bench_allreduce [n_floats] [repeats]
#ifndef USE_MPI
#error "build with mpicxx -DUSE_MPI (see the command above)"
#endif
#define TESTING
#include "../train_gpt2_lora.cpp"

int main(int argc, char** argv) {
    DataParallel dp;
    dp_init(&dp, &argc, &argv);
    size_t n = lora_count_parameters(lora_config(8, 16.0f, LORA_ALL_TARGETS), 12, 768); // L=12, C=768
    int repeats = 50;
    if (argc > 1) n = (size_t)atoll(argv[1]);
    if (argc > 2) repeats = atoi(argv[2]);
    if (n == 0 || repeats <= 0) die("usage: bench_allreduce [n_floats >= 1] [repeats >= 1]");
    std::vector<float> x(n, 1.0f);
    std::vector<double> ms;
    for (int i = 0; i < repeats + 3; i++) {
        MPI_Barrier(MPI_COMM_WORLD); // all ranks enter together: time the transfer, not the wait
        dp_average(&dp, x.data(), n);
        if (i >= 3) ms.push_back(dp.allreduce_ms); // the first calls set up connections and buffers
    }
    std::sort(ms.begin(), ms.end());
    double median = ms[ms.size() / 2];
    // a ring allreduce sends and receives 2 (world-1)/world of the buffer per rank
    double wire = 2.0 * (dp.world - 1) / dp.world * n * sizeof(float);
    printf("allreduce: ranks %d, %zu floats (%.2f MB), median %.3f ms, min %.3f ms, max %.3f ms over %d calls; %.2f GB/s of buffer, %.2f MB on the wire per rank\n",
           dp.world, n, n * 4e-6, median, ms.front(), ms.back(), repeats, n * sizeof(float) / (median * 1e6), wire * 1e-6);
    dp_finalize();
    return 0;
}
