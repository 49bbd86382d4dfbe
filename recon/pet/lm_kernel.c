/* CPU kernel of recon/pet/projector.py: TOF list-mode forward and back projection.

   Same model as the PyTorch path (see projector.py): each LOR is clipped to the image box (and to
   the TOF window of its bin), its stretch [a, b] is cut into n = max(2, ceil((b - a) / step))
   equal pieces sampled at their midpoints, the image is interpolated trilinearly (zero outside
   the voxel centres' box, as grid_sample with align_corners=True and zero padding), and each
   sample is weighted by its piece length [mm] times, for TOF, the probability of the LOR's TOF
   bin. The back-projection visits the same samples with the same weights (exact adjoint).
   Both return 0, or 1 when memory for the per-thread images could not be allocated.
   ``channels`` (1..MAX_CHANNELS) images are projected together along the same samples: image
   arrays [x][y][z][channel], per-LOR values and outputs [lor][channel].

   Geometry g[15]: origin[3] (mm, centre of voxel 0), spacing[3] (mm), box lower[3], upper[3]
   (mm), step (mm), 1 / (sigma sqrt 2) (1/mm, 0 for non-TOF), TOF half range (mm).
   Image arrays are [x][y][z], C order, float32. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t n;        /* samples, 0 when the LOR misses the box */
    double f[3];      /* voxel coordinates of the first sample */
    double df[3];     /* voxel coordinate increment per sample */
    double ell;       /* mm from the midpoint of the first sample */
    double delta;     /* sample spacing [mm] */
} lor_samples;

static lor_samples setup(const double *g, const int64_t *dims, const float *a, const float *b,
                         const int64_t *tof_bin, const float *edges, int64_t e) {
    lor_samples s = {0};
    double mid[3], u[3], length = 0.0, l_in = -INFINITY, l_out = INFINITY;
    for (int k = 0; k < 3; k++) {
        mid[k] = 0.5 * ((double)a[3 * e + k] + (double)b[3 * e + k]);
        u[k] = (double)b[3 * e + k] - (double)a[3 * e + k];
        length += u[k] * u[k];
    }
    length = sqrt(length);
    if (length < 1e-6) length = 1e-6;
    for (int k = 0; k < 3; k++) {
        u[k] /= length;
        double safe = fabs(u[k]) < 1e-9 ? 1e-9 : u[k];
        double t1 = (g[6 + k] - mid[k]) / safe, t2 = (g[9 + k] - mid[k]) / safe;
        l_in = fmax(l_in, fmin(t1, t2));
        l_out = fmin(l_out, fmax(t1, t2));
    }
    if (tof_bin) {
        int64_t bin = tof_bin[e];
        double centre = 0.5 * ((double)edges[bin] + (double)edges[bin + 1]);
        l_in = fmax(l_in, centre - g[14]);
        l_out = fmin(l_out, centre + g[14]);
    }
    double span = l_out - l_in;
    if (!(span > 0.0)) return s;
    s.n = (int64_t)ceil(span / g[12]);
    if (s.n < 2) s.n = 2;
    s.delta = span / (double)s.n;
    s.ell = l_in + 0.5 * s.delta;
    for (int k = 0; k < 3; k++) {
        if (dims[k] == 1) { s.f[k] = 0.0; s.df[k] = 0.0; continue; }  /* grid_sample: one voxel is everywhere */
        s.f[k] = (mid[k] + s.ell * u[k] - g[k]) / g[3 + k];
        s.df[k] = s.delta * u[k] / g[3 + k];
    }
    return s;
}

/* erf tabulated on [-ERF_MAX, ERF_MAX] every 1/ERF_PER_UNIT, linearly interpolated: error below
   1.2e-7 (h^2 / 8 max|erf''|), and erf(+-4.5) = +-(1 - 2e-10) beyond. */
#define MAX_CHANNELS 8  /* image channels projected together (same samples and weights) */
#define ERF_MAX 4.5
#define ERF_PER_UNIT 1024
#define ERF_N ((int)(2 * ERF_MAX * ERF_PER_UNIT) + 2)
static double erf_table[ERF_N];
static int erf_ready = 0;

static void erf_init(void) {
    if (erf_ready) return;
    for (int i = 0; i < ERF_N; i++) erf_table[i] = erf(-ERF_MAX + (double)i / ERF_PER_UNIT);
    erf_ready = 1;
}

static inline double fast_erf(double x) {
    double t = (x + ERF_MAX) * ERF_PER_UNIT;
    t = t < 0.0 ? 0.0 : (t > ERF_N - 1.001 ? ERF_N - 1.001 : t);
    int i = (int)t;
    double r = t - (double)i;
    return erf_table[i] + r * (erf_table[i + 1] - erf_table[i]);
}

static inline double weight(const lor_samples *s, double ell, double scale, double lo, double hi) {
    if (scale == 0.0) return s->delta;
    return 0.5 * s->delta * (fast_erf((hi - ell) * scale) - fast_erf((lo - ell) * scale));
}

/* Trilinear corners of voxel coordinate f: flat indices and weights (corners outside left out). */
static inline int corners(const int64_t *dims, const double *f, int64_t *idx, double *w) {
    int64_t i0[3];
    double t[3];
    for (int k = 0; k < 3; k++) {  /* samples lie in the box: f >= -0.5, truncation of f + 2 is a floor */
        i0[k] = (int64_t)(f[k] + 2.0) - 2;
        t[k] = f[k] - (double)i0[k];
    }
    if (i0[0] >= 0 && i0[1] >= 0 && i0[2] >= 0 && i0[0] + 1 < dims[0] && i0[1] + 1 < dims[1] && i0[2] + 1 < dims[2]) {
        int64_t sy = dims[2], sx = dims[1] * dims[2], base = i0[0] * sx + i0[1] * sy + i0[2];
        double x0 = 1.0 - t[0], y0 = 1.0 - t[1], z0 = 1.0 - t[2];
        idx[0] = base;           w[0] = x0 * y0 * z0;
        idx[1] = base + sx;      w[1] = t[0] * y0 * z0;
        idx[2] = base + sy;      w[2] = x0 * t[1] * z0;
        idx[3] = base + sx + sy; w[3] = t[0] * t[1] * z0;
        idx[4] = base + 1;       w[4] = x0 * y0 * t[2];
        idx[5] = idx[1] + 1;     w[5] = t[0] * y0 * t[2];
        idx[6] = idx[2] + 1;     w[6] = x0 * t[1] * t[2];
        idx[7] = idx[3] + 1;     w[7] = t[0] * t[1] * t[2];
        return 8;
    }
    int m = 0;
    for (int c = 0; c < 8; c++) {
        int64_t ix = i0[0] + (c & 1), iy = i0[1] + ((c >> 1) & 1), iz = i0[2] + ((c >> 2) & 1);
        if (ix < 0 || iy < 0 || iz < 0 || ix >= dims[0] || iy >= dims[1] || iz >= dims[2]) continue;
        double wc = ((c & 1) ? t[0] : 1.0 - t[0]) * (((c >> 1) & 1) ? t[1] : 1.0 - t[1]) * (((c >> 2) & 1) ? t[2] : 1.0 - t[2]);
        idx[m] = (ix * dims[1] + iy) * dims[2] + iz;
        w[m++] = wc;
    }
    return m;
}

int lm_forward(const float *image, const int64_t *dims, const double *g, const float *p1, const float *p2,
                const int64_t *tof_bin, const float *edges, int64_t n_lor, float *out, int threads, int64_t channels) {
    erf_init();
#pragma omp parallel for schedule(dynamic, 512) num_threads(threads)
    for (int64_t e = 0; e < n_lor; e++) {
        lor_samples s = setup(g, dims, p1, p2, tof_bin, edges, e);
        double lo = 0.0, hi = 0.0, total[MAX_CHANNELS] = {0.0}, f[3];
        if (tof_bin) { lo = edges[tof_bin[e]]; hi = edges[tof_bin[e] + 1]; }
        double scale = tof_bin ? g[13] : 0.0;  /* no bins given: non-TOF line integral */
        int64_t idx[8];
        double w[8];
        for (int64_t j = 0; j < s.n; j++) {
            for (int k = 0; k < 3; k++) f[k] = s.f[k] + (double)j * s.df[k];
            int m = corners(dims, f, idx, w);
            double step = weight(&s, s.ell + (double)j * s.delta, scale, lo, hi);
            for (int64_t ch = 0; ch < channels; ch++) {
                double value = 0.0;
                for (int c = 0; c < m; c++) value += w[c] * image[idx[c] * channels + ch];
                total[ch] += value * step;
            }
        }
        for (int64_t ch = 0; ch < channels; ch++) out[e * channels + ch] = (float)total[ch];
    }
    return 0;
}

int lm_back(const float *values, const int64_t *dims, const double *g, const float *p1, const float *p2,
             const int64_t *tof_bin, const float *edges, int64_t n_lor, float *image, int threads, int64_t channels) {
    erf_init();
    int64_t n_vox = dims[0] * dims[1] * dims[2] * channels;
    if (threads < 1) threads = 1;
    float *partial = (float *)calloc((size_t)threads * (size_t)n_vox, sizeof(float));
    if (!partial) return 1;
#pragma omp parallel num_threads(threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *mine = partial + (size_t)me * (size_t)n_vox;
#pragma omp for schedule(dynamic, 512)
        for (int64_t e = 0; e < n_lor; e++) {
            double value[MAX_CHANNELS];  /* local copy: the image stores below cannot alias it */
            int any = 0;
            for (int64_t ch = 0; ch < channels; ch++) {
                value[ch] = (double)values[e * channels + ch];
                any |= value[ch] != 0.0;
            }
            if (!any) continue;
            lor_samples s = setup(g, dims, p1, p2, tof_bin, edges, e);
            double lo = 0.0, hi = 0.0, f[3];
            if (tof_bin) { lo = edges[tof_bin[e]]; hi = edges[tof_bin[e] + 1]; }
            double scale = tof_bin ? g[13] : 0.0;
            int64_t idx[8];
            double w[8];
            for (int64_t j = 0; j < s.n; j++) {
                for (int k = 0; k < 3; k++) f[k] = s.f[k] + (double)j * s.df[k];
                double step = weight(&s, s.ell + (double)j * s.delta, scale, lo, hi);
                int m = corners(dims, f, idx, w);
                double scaled[MAX_CHANNELS];
                for (int64_t ch = 0; ch < channels; ch++) scaled[ch] = value[ch] * step;
                for (int c = 0; c < m; c++) {
                    float *voxel = mine + idx[c] * channels;
                    for (int64_t ch = 0; ch < channels; ch++) voxel[ch] += (float)(w[c] * scaled[ch]);
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t v = 0; v < n_vox; v++) {
            float sum = 0.0f;
            for (int t = 0; t < threads; t++) sum += partial[(size_t)t * (size_t)n_vox + v];
            image[v] += sum;
        }
    }
    free(partial);
    return 0;
}
