/* Exports the plain CBLAS gemm symbols that libmlx resolves dynamically and forwards them to
 * scipy-openblas32, whose symbols carry a scipy_ prefix. Loaded with RTLD_GLOBAL before libmlx,
 * these definitions win over the netlib reference BLAS bundled in the mlx-cpu wheel.
 * The scipy_cblas_* symbols are left undefined here: they resolve against libscipy_openblas,
 * which mlx_distill.fast_blas loads globally first. */

typedef int blasint;

void scipy_cblas_sgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                       const float *a, blasint lda, const float *b, blasint ldb, float beta,
                       float *c, blasint ldc);
void scipy_cblas_dgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, double alpha,
                       const double *a, blasint lda, const double *b, blasint ldb, double beta,
                       double *c, blasint ldc);
void scipy_cblas_cgemm(int order, int ta, int tb, blasint m, blasint n, blasint k,
                       const void *alpha, const void *a, blasint lda, const void *b, blasint ldb,
                       const void *beta, void *c, blasint ldc);

void cblas_sgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c,
                 blasint ldc) {
    scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, double alpha,
                 const double *a, blasint lda, const double *b, blasint ldb, double beta,
                 double *c, blasint ldc) {
    scipy_cblas_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, const void *alpha,
                 const void *a, blasint lda, const void *b, blasint ldb, const void *beta, void *c,
                 blasint ldc) {
    scipy_cblas_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
