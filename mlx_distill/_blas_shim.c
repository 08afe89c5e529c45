/* Exports the plain CBLAS gemm symbols that libmlx resolves dynamically and forwards them to
 * scipy-openblas32, whose symbols carry a scipy_ prefix. Loaded with RTLD_GLOBAL before libmlx,
 * these definitions win over the netlib reference BLAS bundled in the mlx-cpu wheel.
 * The scipy_cblas_* symbols are left undefined here: they resolve against libscipy_openblas,
 * which mlx_distill.fast_blas loads globally first. */

typedef int blasint;

void scipy_cblas_sgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                       const float *a, blasint lda, const float *b, blasint ldb, float beta,
                       float *c, blasint ldc);
void scipy_cblas_sgemv(int order, int trans, blasint m, blasint n, float alpha, const float *a,
                       blasint lda, const float *x, blasint incx, float beta, float *y,
                       blasint incy);
void scipy_cblas_dgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, double alpha,
                       const double *a, blasint lda, const double *b, blasint ldb, double beta,
                       double *c, blasint ldc);
void scipy_cblas_cgemm(int order, int ta, int tb, blasint m, blasint n, blasint k,
                       const void *alpha, const void *a, blasint lda, const void *b, blasint ldb,
                       const void *beta, void *c, blasint ldc);

enum { CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112 };

void cblas_sgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c,
                 blasint ldc) {
    /* MLX sends single-row products (decode: one token times a weight matrix) to sgemm too;
     * OpenBLAS's sgemv does them ~3x faster. c is then one row: a vector with stride 1. */
    if (order == CblasRowMajor && m == 1 && (ta == CblasNoTrans || ta == CblasTrans) &&
        (tb == CblasNoTrans || tb == CblasTrans)) {
        blasint incx = ta == CblasNoTrans ? 1 : lda;
        if (tb == CblasTrans) /* b is (n, k): c = b · a */
            scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        else /* b is (k, n): c = bᵀ · a */
            scipy_cblas_sgemv(CblasRowMajor, CblasTrans, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        return;
    }
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
