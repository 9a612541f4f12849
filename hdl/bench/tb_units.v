// The layer's units as stream modules (flint_units.v, flint_attn.v), each alone on its link
// with random stalls on its input and random backpressure on each output colour (+stall=
// PERCENT, +seed=N), against one layer's vectors from `flint hdl layer` (docs/hdl.md, "Layer
// vectors"): the residual stream's three steps (x_in -> attn_in, + o -> ffn_in, + down ->
// x_out), RoPE on q and k and the quantizer on v, attention over the cache (K and V appended,
// then every head; the cache's new position is checked too) and SwiGLU with gate and up in a
// random interleaving. Every word must match, in order. Prints a UNIT line per step with its
// words and cycles (the figures `make perf` fits; run with +stall=0 for them).
`timescale 1ns/1ps
module tb_units;
    localparam NC = 3, MAXV = 4096, MAXC = 1 << 17, MAXS = 1 << 18;
    reg clk = 0;
    always #1 clk = ~clk;
    reg rst = 1;

    reg [31:0] META [0:10];
    reg [31:0] X_IN [0:MAXV-1], O [0:MAXV-1], DOWN [0:MAXV-1], X_OUT [0:MAXV-1];
    reg [31:0] AN [0:MAXV-1], FN [0:MAXV-1], Q [0:MAXV-1], K [0:MAXV-1], V [0:MAXV-1], ROPE [0:MAXV-1];
    reg [31:0] GATE [0:MAXV-1], UP [0:MAXV-1];
    reg [31:0] ATTN_IN [0:MAXV*9], FFN_IN [0:MAXV*9], Q_ROPE [0:MAXV*9], K_ROPE [0:MAXV*9], V_Q8 [0:MAXV*9];
    reg [31:0] H [0:MAXV*9], ATTN_Q8 [0:MAXV*9];
    reg [31:0] KC [0:MAXC-1], VC [0:MAXC-1];
    reg [31:0] G [0:MAXV*9];         // a term-major golden vector, before remap
    reg [31:0] KS [0:1023], VS [0:1023];
    reg [31:0] SIN [0:MAXS-1];       // the words to send and their colours
    reg [1:0] SCOL [0:MAXS-1];
    reg [31:0] EXP [0:MAXS-1];       // the words expected, in order
    integer n_embd, n_head, n_kv, hd, n_ff, pairs, pos, terms, hb, kvb, rw, len;
    integer nin, nexp, di, ei, cyc, errors, checks, seed, stall_pct, i, j, bb, t, w, a, b;
    reg [8*12:1] what;
    reg [7:0] group;

    // The unit under test (sel) gets the link; the others see it idle.
    reg [1:0] sel = 0;
    reg s_valid = 0;
    reg [1:0] s_colour = 0;
    reg [31:0] s_data = 0;
    reg [NC-1:0] r_ready = 0;
    reg go = 0, ld_we = 0, ld_v = 0;
    reg [16:0] ld_addr = 0;
    reg [31:0] ld_data = 0;
    reg [15:0] c_n = 0;
    reg c_add = 0, c_norm = 0, c_rot = 0;
    reg [12:0] c_wbase = 0;
    wire [NC-1:0] rdy0, rdy1, rdy2, rdy3;
    wire [3:0] tv;
    wire [1:0] tc0, tc1, tc2, tc3;
    wire [31:0] td0, td1, td2, td3;
    wire [3:0] dn;
    wire [31:0] cy0, cy1, cy2, cy3;

    flint_resnorm #(.NC(NC), .AW(13)) u_norm (
        .clk(clk), .rst(rst), .go(go && sel == 0), .cfg_n(c_n), .cfg_add(c_add), .cfg_norm(c_norm),
        .cfg_terms(terms[1:0]), .cfg_wbase(c_wbase), .cfg_eps(META[9]), .cfg_colour(2'd0),
        .ld_we(ld_we && sel == 0), .ld_addr(ld_addr[12:0]), .ld_data(ld_data),
        .rx_valid(s_valid && sel == 0), .rx_colour(s_colour), .rx_data(s_data), .rx_ready(rdy0),
        .tx_valid(tv[0]), .tx_colour(tc0), .tx_data(td0), .tx_ready(r_ready), .done(dn[0]), .stat_cycles(cy0));
    flint_rope #(.NC(NC), .AW(8)) u_rope (
        .clk(clk), .rst(rst), .go(go && sel == 1), .cfg_n(c_n), .cfg_rot(c_rot), .cfg_pairs(pairs[7:0]),
        .cfg_terms(terms[1:0]), .cfg_colour(2'd1),
        .ld_we(ld_we && sel == 1), .ld_addr(ld_addr[8:0]), .ld_data(ld_data),
        .rx_valid(s_valid && sel == 1), .rx_colour(s_colour), .rx_data(s_data), .rx_ready(rdy1),
        .tx_valid(tv[1]), .tx_colour(tc1), .tx_data(td1), .tx_ready(r_ready), .done(dn[1]), .stat_cycles(cy1));
    flint_swiglu #(.NC(NC), .AW(12)) u_swiglu (
        .clk(clk), .rst(rst), .go(go && sel == 2), .cfg_n(c_n), .cfg_terms(terms[1:0]), .cfg_colour(2'd2),
        .rx_valid(s_valid && sel == 2), .rx_colour(s_colour), .rx_data(s_data), .rx_ready(rdy2),
        .tx_valid(tv[2]), .tx_colour(tc2), .tx_data(td2), .tx_ready(r_ready), .done(dn[2]), .stat_cycles(cy2));
    flint_attn #(.NC(NC), .CAW(17), .PAW(12)) u_attn (
        .clk(clk), .rst(rst), .go(go && sel == 3), .cfg_heads(n_head[7:0]), .cfg_group(group),
        .cfg_kv(n_kv[7:0]), .cfg_hb(hb[2:0]), .cfg_terms(terms[1:0]), .cfg_oterms(terms[1:0]),
        .cfg_pos(pos[11:0]), .cfg_scale(META[10]), .cfg_colour(2'd1),
        .ld_we(ld_we && sel == 3), .ld_v(ld_v), .ld_addr(ld_addr), .ld_data(ld_data),
        .rx_valid(s_valid && sel == 3), .rx_colour(s_colour), .rx_data(s_data), .rx_ready(rdy3),
        .tx_valid(tv[3]), .tx_colour(tc3), .tx_data(td3), .tx_ready(r_ready), .done(dn[3]), .stat_cycles(cy3));

    wire [NC-1:0] rdy = sel == 0 ? rdy0 : sel == 1 ? rdy1 : sel == 2 ? rdy2 : rdy3;
    wire t_valid = tv[sel];
    wire [1:0] t_colour = sel == 0 ? tc0 : sel == 1 ? tc1 : sel == 2 ? tc2 : tc3;
    wire [31:0] t_data = sel == 0 ? td0 : sel == 1 ? td1 : sel == 2 ? td2 : td3;
    wire [31:0] t_cycles = sel == 0 ? cy0 : sel == 1 ? cy1 : sel == 2 ? cy2 : cy3;

    function chance;  // true with probability (100 - stall_pct)%
        input integer dummy;
        chance = (($random(seed) % 100) + 100) % 100 >= stall_pct;
    endfunction

    task check;
        input [31:0] got, want;
        input integer idx;
        begin
            checks = checks + 1;
            if (got !== want) begin
                errors = errors + 1;
                if (errors <= 20) $display("FAIL: %0s word %0d: %h, expected %h", what, idx, got, want);
            end
        end
    endtask

    // EXP[0..) = G (term-major: term t's nb blocks of 9 words) in stream order (block by
    // block, a block's terms one after the other).
    task remap;
        input integer nb;
        begin
            for (bb = 0; bb < nb; bb = bb + 1)
                for (t = 0; t < terms; t = t + 1)
                    for (w = 0; w < 9; w = w + 1)
                        EXP[(bb * terms + t) * 9 + w] = G[(t * nb + bb) * 9 + w];
            nexp = nb * terms * 9;
        end
    endtask

    task load;  // one word through the unit's load port
        input integer addr;
        input [31:0] data;
        begin
            @(negedge clk);
            ld_we = 1; ld_addr = addr; ld_data = data;
            @(negedge clk);
            ld_we = 0;
        end
    endtask

    // Start unit `sel`, send SIN[0..nin) and take its words, checking them against EXP[0..nexp),
    // until it is done; then a UNIT line.
    task run;
        input [8*12:1] name;
        begin
            what = name;
            @(negedge clk); go = 1;
            @(negedge clk); go = 0;
            di = 0; ei = 0; cyc = 0;
            while ((di < nin || ei < nexp || !dn[sel]) && cyc < 4000000) begin
                @(negedge clk);
                s_valid = di < nin && chance(0);
                s_data = SIN[di];
                s_colour = SCOL[di];
                for (a = 0; a < NC; a = a + 1) r_ready[a] = chance(0);
                #0.5;
                if (s_valid && rdy[s_colour]) di = di + 1;
                if (t_valid && r_ready[t_colour]) begin
                    if (ei < nexp) check(t_data, EXP[ei], ei);
                    else begin errors = errors + 1; $display("FAIL: %0s: a word beyond the %0d expected", name, nexp); end
                    ei = ei + 1;
                end
                cyc = cyc + 1;
            end
            @(negedge clk); s_valid = 0;
            if (!dn[sel] || di < nin || ei < nexp) begin
                errors = errors + 1;
                $display("FAIL: %0s: stuck after %0d cycles (%0d of %0d words in, %0d of %0d out)", name, cyc, di, nin, ei, nexp);
            end
            $display("UNIT name=%0s layer=%0d pos=%0d terms=%0d heads=%0d hb=%0d in=%0d out=%0d cycles=%0d stall=%0d",
                     name, META[6], pos, terms, n_head, hb, nin, nexp, t_cycles, stall_pct);
        end
    endtask

    initial begin
        errors = 0; checks = 0;
        if (!$value$plusargs("seed=%d", seed)) seed = 1;
        if (!$value$plusargs("stall=%d", stall_pct)) stall_pct = 0;
        $readmemh("meta.hex", META);
        n_embd = META[0]; n_head = META[1]; n_kv = META[2]; hd = META[3]; n_ff = META[4];
        pairs = META[5]; pos = META[7]; terms = META[8];
        group = n_head / n_kv; len = pos + 1; hb = hd / 32; kvb = n_kv * hb; rw = terms * kvb * 9;
        $readmemh("x_in.hex", X_IN, 0, n_embd - 1);
        $readmemh("o.hex", O, 0, n_embd - 1);
        $readmemh("down.hex", DOWN, 0, n_embd - 1);
        $readmemh("x_out.hex", X_OUT, 0, n_embd - 1);
        $readmemh("attn_norm.hex", AN, 0, n_embd - 1);
        $readmemh("ffn_norm.hex", FN, 0, n_embd - 1);
        $readmemh("q.hex", Q, 0, n_head * hd - 1);
        $readmemh("k.hex", K, 0, kvb * 32 - 1);
        $readmemh("v.hex", V, 0, kvb * 32 - 1);
        $readmemh("rope.hex", ROPE, 0, 2 * pairs - 1);
        $readmemh("gate.hex", GATE, 0, n_ff - 1);
        $readmemh("up.hex", UP, 0, n_ff - 1);
        $readmemh("attn_in.hex", ATTN_IN, 0, terms * n_embd / 32 * 9 - 1);
        $readmemh("ffn_in.hex", FFN_IN, 0, terms * n_embd / 32 * 9 - 1);
        $readmemh("q_rope.hex", Q_ROPE, 0, terms * n_head * hb * 9 - 1);
        $readmemh("k_rope.hex", K_ROPE, 0, terms * kvb * 9 - 1);
        $readmemh("v_q8.hex", V_Q8, 0, terms * kvb * 9 - 1);
        $readmemh("h.hex", H, 0, terms * n_ff / 32 * 9 - 1);
        $readmemh("attn_q8.hex", ATTN_Q8, 0, terms * n_head * hb * 9 - 1);
        $readmemh("k_cache.hex", KC, 0, len * rw - 1);
        $readmemh("v_cache.hex", VC, 0, len * rw - 1);
        if (len * rw > MAXC || hd > 128 || n_embd * 2 > 8192 || n_ff > 4096 || len > 4096) begin
            $display("FAIL: the layer's shape is beyond this bench's memories");
            $finish;
        end
        repeat (3) @(negedge clk);
        rst = 0;

        // The residual stream: both norms' weights, then its three steps.
        sel = 0;
        for (i = 0; i < n_embd; i = i + 1) load(i, AN[i]);
        for (i = 0; i < n_embd; i = i + 1) load(n_embd + i, FN[i]);
        c_n = n_embd; nin = n_embd;
        for (i = 0; i < n_embd; i = i + 1) begin SIN[i] = X_IN[i]; SCOL[i] = 0; end
        for (i = 0; i < terms * n_embd / 32 * 9; i = i + 1) G[i] = ATTN_IN[i];
        remap(n_embd / 32);
        c_add = 0; c_norm = 1; c_wbase = 0;
        run("attn_norm");
        for (i = 0; i < n_embd; i = i + 1) SIN[i] = O[i];
        for (i = 0; i < terms * n_embd / 32 * 9; i = i + 1) G[i] = FFN_IN[i];
        remap(n_embd / 32);
        c_add = 1; c_norm = 1; c_wbase = n_embd;
        run("ffn_norm");
        for (i = 0; i < n_embd; i = i + 1) begin SIN[i] = DOWN[i]; EXP[i] = X_OUT[i]; end
        nexp = n_embd;
        c_add = 1; c_norm = 0;
        run("residual");

        // RoPE: the position's table, then q, k (rotated) and v (quantized as it is).
        sel = 1;
        for (i = 0; i < 2 * pairs; i = i + 1) load(i, ROPE[i]);
        c_rot = 1; c_n = n_head * hd; nin = n_head * hd;
        for (i = 0; i < nin; i = i + 1) SIN[i] = Q[i];
        for (i = 0; i < terms * n_head * hb * 9; i = i + 1) G[i] = Q_ROPE[i];
        remap(n_head * hb);
        run("rope_q");
        c_n = kvb * 32; nin = kvb * 32;
        for (i = 0; i < nin; i = i + 1) SIN[i] = K[i];
        for (i = 0; i < terms * kvb * 9; i = i + 1) G[i] = K_ROPE[i];
        remap(kvb);
        for (i = 0; i < nexp; i = i + 1) KS[i] = EXP[i];
        run("rope_k");
        c_rot = 0;
        for (i = 0; i < nin; i = i + 1) SIN[i] = V[i];
        for (i = 0; i < terms * kvb * 9; i = i + 1) G[i] = V_Q8[i];
        remap(kvb);
        for (i = 0; i < nexp; i = i + 1) VS[i] = EXP[i];
        run("v_q8");

        // Attention: the earlier positions' K and V through the load port (in the unit's
        // layout), then the new K and V words alternating, then every head's Q.
        sel = 3;
        for (j = 0; j < pos; j = j + 1)
            for (bb = 0; bb < kvb; bb = bb + 1)
                for (t = 0; t < terms; t = t + 1)
                    for (w = 0; w < 9; w = w + 1) begin
                        ld_v = 0; load(j * rw + (bb * terms + t) * 9 + w, KC[j * rw + (t * kvb + bb) * 9 + w]);
                        ld_v = 1; load(j * rw + (bb * terms + t) * 9 + w, VC[j * rw + (t * kvb + bb) * 9 + w]);
                    end
        nin = 0;
        for (i = 0; i < rw; i = i + 1) begin
            SIN[nin] = KS[i]; SCOL[nin] = 0; SIN[nin + 1] = VS[i]; SCOL[nin + 1] = 1; nin = nin + 2;
        end
        for (i = 0; i < terms * n_head * hb * 9; i = i + 1) G[i] = Q_ROPE[i];
        remap(n_head * hb);
        for (i = 0; i < nexp; i = i + 1) begin SIN[nin + i] = EXP[i]; SCOL[nin + i] = 2; end
        nin = nin + nexp;
        for (i = 0; i < terms * n_head * hb * 9; i = i + 1) G[i] = ATTN_Q8[i];
        remap(n_head * hb);
        run("attention");
        what = "k_cache";
        for (i = 0; i < rw; i = i + 1) check(u_attn.km[pos * rw + i], KS[i], i);
        what = "v_cache";
        for (i = 0; i < rw; i = i + 1) check(u_attn.vm[pos * rw + i], VS[i], i);

        // SwiGLU: gate and up in a random interleaving.
        sel = 2;
        c_n = n_ff;
        a = 0; b = 0; nin = 0;
        while (a < n_ff || b < n_ff) begin
            if (b == n_ff || (a < n_ff && ($random(seed) & 1))) begin SIN[nin] = GATE[a]; SCOL[nin] = 0; a = a + 1; end
            else begin SIN[nin] = UP[b]; SCOL[nin] = 1; b = b + 1; end
            nin = nin + 1;
        end
        for (i = 0; i < terms * n_ff / 32 * 9; i = i + 1) G[i] = H[i];
        remap(n_ff / 32);
        run("swiglu");

        $display("units: layer %0d, position %0d, %0d term(s), stall %0d%%: %0d words checked (norms, residual, RoPE, attention over %0d positions with the cache appended, SwiGLU)",
                 META[6], pos, terms, stall_pct, checks, len);
        if (errors == 0 && checks > 0) $display("PASS"); else $display("FAIL: %0d errors", errors);
        $finish;
    end
endmodule
