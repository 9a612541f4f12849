// The numeric contract (docs/hdl.md), shared by the PE and the unit benches.

// Term of one block product: psum = sum of the 32 int8 products, ws/as = f16 scales.
// Returns +-(|psum| * m_w * m_a) << (E_w + E_a - 2): the exact value in units of 2^-48.
function [127:0] q8_term;
    input signed [20:0] psum;
    input [15:0] ws;
    input [15:0] as;
    reg [10:0] mw, ma;
    reg [5:0] ew, ea;
    reg [19:0] mag_p;
    reg [41:0] mag;
    reg [127:0] t;
    begin
        mw = (ws[14:10] == 0) ? {1'b0, ws[9:0]} : {1'b1, ws[9:0]};
        ma = (as[14:10] == 0) ? {1'b0, as[9:0]} : {1'b1, as[9:0]};
        ew = (ws[14:10] == 0) ? 6'd1 : {1'b0, ws[14:10]};
        ea = (as[14:10] == 0) ? 6'd1 : {1'b0, as[14:10]};
        mag_p = psum[20] ? -psum : psum;
        mag = mag_p * mw * ma;
        t = {86'b0, mag} << (ew + ea - 6'd2);
        q8_term = (psum[20] ^ ws[15] ^ as[15]) ? -t : t;
    end
endfunction

// acc * 2^-48 rounded to the nearest f32, ties to even; +0 for 0.
function [31:0] acc_to_f32;
    input [127:0] acc;
    reg sign;
    reg [127:0] mag, rest, half, shifted;
    reg [24:0] mant;
    integer lead, i, drop;
    reg up;
    reg [7:0] exp8;
    begin
        sign = acc[127];
        mag = sign ? -acc : acc;
        lead = 0;
        for (i = 0; i < 128; i = i + 1)
            if (mag[i]) lead = i;
        if (mag == 0) begin
            acc_to_f32 = 32'h0;
        end else begin
            if (lead > 23) begin
                drop = lead - 23;
                shifted = mag >> drop;
                rest = mag & ((128'd1 << drop) - 1);
                half = 128'd1 << (drop - 1);
                up = (rest > half) || (rest == half && shifted[0]);
                mant = shifted[24:0] + up;
            end else begin
                shifted = mag << (23 - lead);
                mant = shifted[24:0];
            end
            if (mant[24]) begin
                mant = mant >> 1;
                lead = lead + 1;
            end
            exp8 = lead + 79;
            acc_to_f32 = {sign, exp8, mant[22:0]};
        end
    end
endfunction

// Sum of four int8 x int8 products (one 32-bit word of each block).
function signed [17:0] dot4;
    input [31:0] a;
    input [31:0] b;
    begin
        dot4 = $signed(a[7:0]) * $signed(b[7:0]) + $signed(a[15:8]) * $signed(b[15:8])
             + $signed(a[23:16]) * $signed(b[23:16]) + $signed(a[31:24]) * $signed(b[31:24]);
    end
endfunction

// Sum of eight nibble x int8 products: word w's eight unsigned nibbles (element j at bits
// 4j) against two activation words (elements 0-3, then 4-7).
function signed [17:0] dot8n;
    input [31:0] w;
    input [31:0] a0;
    input [31:0] a1;
    integer j;
    reg [63:0] a;
    reg signed [17:0] s;
    begin
        a = {a1, a0};
        s = 0;
        for (j = 0; j < 8; j = j + 1)
            s = s + $signed({1'b0, w[4*j +: 4]}) * $signed(a[8*j +: 8]);
        dot8n = s;
    end
endfunction
