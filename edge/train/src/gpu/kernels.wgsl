// DAI head training kernels. One bind group layout for all entry points:
// binding 0 = uniforms, bindings 1..5 = f32 storage buffers whose meaning
// depends on the kernel (see gpu.rs). Formulas match cpu.rs / optim.rs.

struct P {
    m: u32,      // rows (batch) or element count
    k: u32,      // inner / input features
    n: u32,      // outputs
    act: u32,    // 0 relu, 1 gelu, 2 none
    lr: f32,
    b1: f32,     // adam beta1 / sgd momentum
    b2: f32,
    eps: f32,
    c1: f32,     // adam bias corrections 1 - beta^t
    c2: f32,
    _pad0: f32,
    _pad1: f32,
};

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> s1: array<f32>;
@group(0) @binding(2) var<storage, read_write> s2: array<f32>;
@group(0) @binding(3) var<storage, read_write> s3: array<f32>;
@group(0) @binding(4) var<storage, read_write> s4: array<f32>;
@group(0) @binding(5) var<storage, read_write> s5: array<f32>;

const GELU_C: f32 = 0.7978846;

fn act_f(z: f32) -> f32 {
    if (p.act == 0u) { return max(z, 0.0); }
    if (p.act == 1u) {
        let u = GELU_C * (z + 0.044715 * z * z * z);
        return 0.5 * z * (1.0 + tanh(u));
    }
    return z;
}

fn act_d(z: f32) -> f32 {
    if (p.act == 0u) { return select(0.0, 1.0, z > 0.0); }
    if (p.act == 1u) {
        let u = GELU_C * (z + 0.044715 * z * z * z);
        let t = tanh(u);
        let du = GELU_C * (1.0 + 3.0 * 0.044715 * z * z);
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du;
    }
    return 1.0;
}

// Z[m,n] = X[m,k] . W[n,k]^T + b[n]; A = act(Z).  s1=X s2=W s3=b s4=Z s5=A
@compute @workgroup_size(8, 8)
fn linear_fwd(@builtin(global_invocation_id) g: vec3<u32>) {
    let col = g.x;
    let row = g.y;
    if (row >= p.m || col >= p.n) { return; }
    var acc = s3[col];
    for (var i = 0u; i < p.k; i = i + 1u) {
        acc = acc + s1[row * p.k + i] * s2[col * p.k + i];
    }
    s4[row * p.n + col] = acc;
    s5[row * p.n + col] = act_f(acc);
}

// dZ = dA * act'(Z), in place over m elements.  s1=dA->dZ s2=Z
@compute @workgroup_size(64)
fn act_bwd(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i >= p.m) { return; }
    s1[i] = s1[i] * act_d(s2[i]);
}

// dW[n,k] = dZ[m,n]^T . X[m,k].  s1=dZ s2=X s3=dW
@compute @workgroup_size(8, 8)
fn grad_w(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    let o = g.y;
    if (o >= p.n || i >= p.k) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.m; r = r + 1u) {
        acc = acc + s1[r * p.n + o] * s2[r * p.k + i];
    }
    s3[o * p.k + i] = acc;
}

// db[n] = sum over rows of dZ.  s1=dZ s3=db
@compute @workgroup_size(64)
fn grad_b(@builtin(global_invocation_id) g: vec3<u32>) {
    let o = g.x;
    if (o >= p.n) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.m; r = r + 1u) {
        acc = acc + s1[r * p.n + o];
    }
    s3[o] = acc;
}

// dX[m,k] = dZ[m,n] . W[n,k].  s1=dZ s2=W s3=dX
@compute @workgroup_size(8, 8)
fn grad_x(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    let r = g.y;
    if (r >= p.m || i >= p.k) { return; }
    var acc = 0.0;
    for (var o = 0u; o < p.n; o = o + 1u) {
        acc = acc + s1[r * p.n + o] * s2[o * p.k + i];
    }
    s3[r * p.k + i] = acc;
}

// Softmax cross-entropy per row.  s1=logits[m,n] s2=labels[m] (as f32)
// s3=dlogits[m,n] s4=row loss[m]
@compute @workgroup_size(64)
fn softmax_ce(@builtin(global_invocation_id) g: vec3<u32>) {
    let r = g.x;
    if (r >= p.m) { return; }
    var mx = s1[r * p.n];
    for (var j = 1u; j < p.n; j = j + 1u) { mx = max(mx, s1[r * p.n + j]); }
    var sum = 0.0;
    for (var j = 0u; j < p.n; j = j + 1u) { sum = sum + exp(s1[r * p.n + j] - mx); }
    let lse = mx + log(sum);
    let y = u32(s2[r]);
    s4[r] = lse - s1[r * p.n + y];
    for (var j = 0u; j < p.n; j = j + 1u) {
        let pj = exp(s1[r * p.n + j] - lse);
        let t = select(0.0, 1.0, j == y);
        s3[r * p.n + j] = (pj - t) / f32(p.m);
    }
}

// Mean squared error per element (m = rows * outputs).
// s1=outputs s2=targets s3=doutputs s4=squared error
@compute @workgroup_size(64)
fn mse(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i >= p.m) { return; }
    let d = s1[i] - s2[i];
    s4[i] = d * d;
    s3[i] = 2.0 * d / f32(p.m);
}

// SGD with momentum over m values.  s1=w s2=g s3=velocity
@compute @workgroup_size(64)
fn sgd(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i >= p.m) { return; }
    let v = p.b1 * s3[i] + s2[i];
    s3[i] = v;
    s1[i] = s1[i] - p.lr * v;
}

// Adam over m values.  s1=w s2=g s3=m s4=v
@compute @workgroup_size(64)
fn adam(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i >= p.m) { return; }
    let gi = s2[i];
    let m = p.b1 * s3[i] + (1.0 - p.b1) * gi;
    let v = p.b2 * s4[i] + (1.0 - p.b2) * gi * gi;
    s3[i] = m;
    s4[i] = v;
    s1[i] = s1[i] - p.lr * (m / p.c1) / (sqrt(v / p.c2) + p.eps);
}
