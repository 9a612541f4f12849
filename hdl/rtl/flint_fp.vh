// IEEE-754 binary32 arithmetic of the layer contract (docs/hdl.md, "The decoder layer"):
// round to nearest, ties to even, subnormals in and out, overflow to infinity; inputs are
// finite (the contract never makes infinities or NaNs). Combinational functions shared by
// the layer's units and the unit benches.

// The f32 nearest to mag * 2^exp (ties to even), with the given sign: the one rounding step
// of every operation here.
function [31:0] fp_pack;
    input sign;
    input [63:0] mag;
    input integer exp;
    integer lead, i, q, sh;
    reg [64:0] mant, rest, half;
    reg up;
    begin
        lead = -1;
        for (i = 0; i < 64; i = i + 1)
            if (mag[i]) lead = i;
        if (lead < 0) begin
            fp_pack = {sign, 31'b0};
        end else begin
            // The result's quantum: 24 significant bits, or 2^-149 for subnormals.
            q = lead + exp - 23;
            if (q < -149) q = -149;
            sh = q - exp;
            if (sh > 64) begin
                mant = 0; // below half the quantum: rounds to zero
            end else if (sh > 0) begin
                mant = mag >> sh;
                rest = mag & ((65'd1 << sh) - 1);
                half = 65'd1 << (sh - 1);
                up = (rest > half) || (rest == half && mant[0]);
                mant = mant + up;
            end else begin
                mant = mag << (-sh);
            end
            if (mant[24]) begin
                mant = mant >> 1;
                q = q + 1;
            end
            if (!mant[23])
                fp_pack = {sign, 8'd0, mant[22:0]};
            else if (q + 150 >= 255)
                fp_pack = {sign, 8'hff, 23'd0};
            else
                fp_pack = {sign, q[7:0] + 8'd150, mant[22:0]};
        end
    end
endfunction

// Significand (with the hidden bit) and the exponent of its unit: x = m * 2^(e - 150).
function [23:0] fp_sig;
    input [31:0] x;
    fp_sig = (x[30:23] == 0) ? {1'b0, x[22:0]} : {1'b1, x[22:0]};
endfunction

function integer fp_exp;
    input [31:0] x;
    fp_exp = (x[30:23] == 0) ? 1 : x[30:23];
endfunction

// a * b: the exact 48-bit product, rounded once.
function [31:0] fp_mul;
    input [31:0] a;
    input [31:0] b;
    reg [63:0] p;
    begin
        p = fp_sig(a) * fp_sig(b);
        fp_mul = fp_pack(a[31] ^ b[31], p, fp_exp(a) + fp_exp(b) - 300);
    end
endfunction

// a + b: aligned 30 bits below the larger operand's unit; an operand more than 30 binades
// below is less than 2^-6 of the result's unit and only its sign and presence matter (one
// sticky unit), so the rounding is that of the exact sum. An exact zero sum is +0, unless
// both operands are -0.
function [31:0] fp_add;
    input [31:0] a;
    input [31:0] b;
    reg [31:0] x, y;
    integer d, ex;
    reg signed [63:0] hi, lo, s;
    begin
        if (fp_exp(a) >= fp_exp(b)) begin x = a; y = b; end else begin x = b; y = a; end
        ex = fp_exp(x);
        d = ex - fp_exp(y);
        hi = {40'd0, fp_sig(x)} << 30;
        if (d <= 30)
            lo = {40'd0, fp_sig(y)} << (30 - d);
        else
            lo = (fp_sig(y) != 0) ? 64'sd1 : 64'sd0;
        s = (x[31] ? -hi : hi) + (y[31] ? -lo : lo);
        if (s == 0)
            fp_add = {a[31] & b[31], 31'b0};
        else
            fp_add = fp_pack(s < 0, s < 0 ? -s : s, ex - 180);
    end
endfunction

// x's significand shifted up to 24 bits (bit 23 set) and its exponent, x = m * 2^e
// (x non-zero).
function [23:0] fp_norm_sig;
    input [31:0] x;
    reg [23:0] m;
    integer i;
    begin
        m = fp_sig(x);
        for (i = 0; i < 24; i = i + 1)
            if (!m[23]) m = m << 1;
        fp_norm_sig = m;
    end
endfunction

function integer fp_norm_exp;
    input [31:0] x;
    reg [23:0] m;
    integer i, e;
    begin
        m = fp_sig(x);
        e = fp_exp(x) - 150;
        for (i = 0; i < 24; i = i + 1)
            if (!m[23]) begin m = m << 1; e = e - 1; end
        fp_norm_exp = e;
    end
endfunction

// a / b (b non-zero; 0 gives infinity): 27 quotient bits of the normalized significands and a
// sticky bit for the remainder, rounded once.
function [31:0] fp_div;
    input [31:0] a;
    input [31:0] b;
    reg [63:0] q, r;
    begin
        if (b[30:0] == 0)
            fp_div = {a[31] ^ b[31], 8'hff, 23'd0};
        else if (a[30:0] == 0)
            fp_div = {a[31] ^ b[31], 31'd0};
        else begin
            q = ({40'd0, fp_norm_sig(a)} << 26) / fp_norm_sig(b);
            r = ({40'd0, fp_norm_sig(a)} << 26) % fp_norm_sig(b);
            fp_div = fp_pack(a[31] ^ b[31], {q, 1'b0} | (r != 0), fp_norm_exp(a) - fp_norm_exp(b) - 27);
        end
    end
endfunction

// sqrt(a), a >= 0 (-0 gives -0): the integer square root of the significand shifted to an
// even exponent, 27 bits, and a sticky bit for its remainder, rounded once.
function [31:0] fp_sqrt;
    input [31:0] a;
    reg [63:0] m, r, t;
    integer e, i;
    begin
        if (a[30:0] == 0) begin
            fp_sqrt = a;
        end else begin
            m = {40'd0, fp_norm_sig(a)};
            e = fp_norm_exp(a);
            if (e % 2 != 0) begin m = m << 1; e = e - 1; end
            m = m << 30;
            e = e - 30;
            r = 0;
            for (i = 27; i >= 0; i = i - 1) begin
                t = r | (64'd1 << i);
                if (t * t <= m) r = t;
            end
            fp_sqrt = fp_pack(1'b0, {r, 1'b0} | (r * r != m), e / 2 - 1);
        end
    end
endfunction

// round_ties_even(t) as an integer, for |t| < 2^23 (the contract's 2^t clamps t first).
function integer fp_round_int;
    input [31:0] t;
    integer sh;
    reg [63:0] m, rest, half, n;
    begin
        m = {40'd0, fp_sig(t)};
        sh = 150 - fp_exp(t);
        if (sh <= 0) begin
            n = m << (-sh);
        end else if (sh > 40) begin
            n = 0;
        end else begin
            n = m >> sh;
            rest = m & ((64'd1 << sh) - 1);
            half = 64'd1 << (sh - 1);
            n = n + ((rest > half) || (rest == half && n[0]));
        end
        fp_round_int = t[31] ? -n : n;
    end
endfunction

// The contract's 2^t: 0 below -125, t clamped to at most 126, n = round_ties_even(t),
// f = t - n, the degree-6 polynomial by Horner's rule, times 2^n.
function [31:0] fp_exp2;
    input [31:0] t_in;
    reg [31:0] t, nf, f, y;
    integer n;
    begin
        if (t_in[31] && t_in[30:0] > 31'h42fa0000) begin
            fp_exp2 = 32'd0;
        end else begin
            t = (!t_in[31] && t_in[30:0] > 31'h42fc0000) ? 32'h42fc0000 : t_in;
            n = fp_round_int(t);
            nf = fp_pack(t[31], n < 0 ? -n : n, 0);
            f = fp_add(t, {~nf[31], nf[30:0]});
            y = 32'h3920fdde;
            y = fp_add(fp_mul(y, f), 32'h3aaf9f2a);
            y = fp_add(fp_mul(y, f), 32'h3c1d96a6);
            y = fp_add(fp_mul(y, f), 32'h3d635774);
            y = fp_add(fp_mul(y, f), 32'h3e75fdee);
            y = fp_add(fp_mul(y, f), 32'h3f317218);
            y = fp_add(fp_mul(y, f), 32'h3f800000);
            fp_exp2 = fp_mul(y, {1'b0, n[7:0] + 8'd127, 23'd0});
        end
    end
endfunction
