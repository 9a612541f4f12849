// The whole decoder layer on the mesh (flint_decoder.v) against one layer's vectors from
// `flint hdl layer` (docs/hdl.md, "Layer vectors"): every region's weights as the model
// stores them (layer_w.hex) tiled over its mesh, both norms, the RoPE table, the cache of the
// earlier positions; then x_in goes in with random stalls (+stall=PERCENT, +seed=N) and
// x_out comes out under random backpressure, every word checked against the golden bits.
// Taps on the fifteen streams between regions and units check each in order too (a failure
// names the first stream that went wrong), and the cache's new position is checked. Prints
// a LAYER line with the layer's cycles and a TAP line per stream (its first and last word's
// cycle after go: the dataflow's timeline), then PASS or FAIL.
`timescale 1ns/1ps
module tb_decoder;
    parameter QR = 4, QC = 2, KR = 2, KC = 2, VR = 2, VC = 2, OR = 4, OC = 2;
    parameter GR = 6, GC = 3, DR = 4, DC = 6;
    parameter MEM_AW = 14, ROWS_AW = 8;
    localparam NT = 15, MAXV = 8192, MAXW = 1 << 21, MAXC = 1 << 17, MAXX = 1 << 17;
    reg clk = 0;
    always #1 clk = ~clk;
    reg rst = 1;

    reg [31:0] META [0:10];
    reg [31:0] WMETA [0:20];
    reg [31:0] W [0:MAXW-1];
    reg [31:0] X_IN [0:MAXV-1], AN [0:MAXV-1], FN [0:MAXV-1], ROPE [0:MAXV-1];
    reg [31:0] KC_ [0:MAXC-1], VC_ [0:MAXC-1];
    reg [31:0] G [0:MAXV*9];
    reg [31:0] TX [0:MAXX-1];        // every tap's expected words, tap i from TB[i]
    integer TB [0:NT], TG [0:NT-1], TF [0:NT-1], TL [0:NT-1], TE [0:NT-1];
    integer n_embd, n_head, n_kv, hd, n_ff, pairs, pos, terms, hb, kvb, rw, len;
    integer errors, checks, seed, stall_pct, cyc, t0, i, j, bb, t, w, u, wb, nx, ny;

    reg go = 0, ld_we = 0, cfg_we = 0;
    reg [3:0] ld_unit = 0, cfg_unit = 0, cfg_sel = 0;
    reg [15:0] ld_pe = 0, cfg_pe = 0;
    reg [31:0] ld_addr = 0, ld_data = 0, cfg_data = 0;
    reg x_valid = 0, y_ready = 0;
    reg [31:0] x_data = 0;
    wire x_ready, y_valid, done;
    wire [31:0] y_data;

    flint_decoder #(.QR(QR), .QC(QC), .KR(KR), .KC(KC), .VR(VR), .VC(VC), .OR(OR), .OC(OC),
                    .GR(GR), .GC(GC), .DR(DR), .DC(DC), .MEM_AW(MEM_AW), .ROWS_AW(ROWS_AW)) dut (
        .clk(clk), .rst(rst), .go(go), .done(done),
        .ld_we(ld_we), .ld_unit(ld_unit), .ld_pe(ld_pe), .ld_addr(ld_addr), .ld_data(ld_data),
        .cfg_we(cfg_we), .cfg_unit(cfg_unit), .cfg_pe(cfg_pe), .cfg_sel(cfg_sel), .cfg_data(cfg_data),
        .x_valid(x_valid), .x_ready(x_ready), .x_data(x_data),
        .y_valid(y_valid), .y_ready(y_ready), .y_data(y_data)
    );

    // The taps: each stream's transfers, in the order docs/hdl.md's dataflow lists them.
    wire [NT-1:0] tf;
    wire [NT*32-1:0] td;
    assign tf[0] = dut.rn_v && dut.rn_r && dut.step == 2'd1;  assign td[0*32 +: 32] = dut.rn_d;
    assign tf[1] = dut.q_ov && dut.q_or;   assign td[1*32 +: 32] = dut.q_od;
    assign tf[2] = dut.k_ov && dut.k_or;   assign td[2*32 +: 32] = dut.k_od;
    assign tf[3] = dut.v_ov && dut.v_or;   assign td[3*32 +: 32] = dut.v_od;
    assign tf[4] = dut.gq;                 assign td[4*32 +: 32] = dut.rq_d;
    assign tf[5] = dut.gk;                 assign td[5*32 +: 32] = dut.rk_d;
    assign tf[6] = dut.gv;                 assign td[6*32 +: 32] = dut.rv_d;
    assign tf[7] = dut.at_v && dut.at_r;   assign td[7*32 +: 32] = dut.at_d;
    assign tf[8] = dut.o_v && dut.o_r;     assign td[8*32 +: 32] = dut.o_d;
    assign tf[9] = dut.rn_v && dut.rn_r && dut.step == 2'd2;  assign td[9*32 +: 32] = dut.rn_d;
    assign tf[10] = dut.g_ov && dut.g_or;  assign td[10*32 +: 32] = dut.g_od;
    assign tf[11] = dut.u_ov && dut.u_or;  assign td[11*32 +: 32] = dut.u_od;
    assign tf[12] = dut.sw_v && dut.sw_r;  assign td[12*32 +: 32] = dut.sw_d;
    assign tf[13] = dut.d_v && dut.d_r;    assign td[13*32 +: 32] = dut.d_d;
    assign tf[14] = y_valid && y_ready;    assign td[14*32 +: 32] = y_data;
    reg [8*8:1] tname [0:NT-1];
    initial begin
        tname[0] = "attn_in"; tname[1] = "q"; tname[2] = "k"; tname[3] = "v"; tname[4] = "q_rope";
        tname[5] = "k_rope"; tname[6] = "v_q8"; tname[7] = "attn"; tname[8] = "o"; tname[9] = "ffn_in";
        tname[10] = "gate"; tname[11] = "up"; tname[12] = "h"; tname[13] = "down"; tname[14] = "x_out";
    end
    integer ti;
    always @(posedge clk)
        if (t0 > 0)
            for (ti = 0; ti < NT; ti = ti + 1)
                if (tf[ti]) begin
                    if (TG[ti] == 0) TF[ti] = cyc - t0;
                    TL[ti] = cyc - t0;
                    checks = checks + 1;
                    if (TG[ti] >= TB[ti + 1] - TB[ti]) begin
                        errors = errors + 1;
                        $display("FAIL: %0s: a word beyond the %0d expected", tname[ti], TB[ti + 1] - TB[ti]);
                    end else if (td[ti*32 +: 32] !== TX[TB[ti] + TG[ti]]) begin
                        errors = errors + 1;
                        TE[ti] = TE[ti] + 1;
                        if (TE[ti] <= 3)
                            $display("FAIL: %0s word %0d: %h, expected %h (cycle %0d)", tname[ti], TG[ti], td[ti*32 +: 32], TX[TB[ti] + TG[ti]], cyc - t0);
                    end
                    TG[ti] = TG[ti] + 1;
                end
    always @(posedge clk) cyc <= cyc + 1;

    function chance;  // true with probability (100 - stall_pct)%
        input integer dummy;
        chance = (($random(seed) % 100) + 100) % 100 >= stall_pct;
    endfunction

    // Tap `ti`'s expected words: `n` f32 values from `file`, or (q8) `n` blocks of a
    // term-major vector put in stream order (block by block, a block's terms in turn).
    task expect_f32;
        input integer tap, n;
        input [8*16:1] file;
        begin
            $readmemh(file, G, 0, n - 1);
            for (i = 0; i < n; i = i + 1) TX[TB[tap] + i] = G[i];
            TB[tap + 1] = TB[tap] + n;
        end
    endtask
    task expect_q8;
        input integer tap, nb;
        input [8*16:1] file;
        begin
            $readmemh(file, G, 0, terms * nb * 9 - 1);
            for (bb = 0; bb < nb; bb = bb + 1)
                for (t = 0; t < terms; t = t + 1)
                    for (w = 0; w < 9; w = w + 1)
                        TX[TB[tap] + (bb * terms + t) * 9 + w] = G[(t * nb + bb) * 9 + w];
            TB[tap + 1] = TB[tap] + terms * nb * 9;
        end
    endtask

    // One word a cycle through the load and configuration buses.
    task load;
        input integer unit, pe, addr;
        input [31:0] data;
        begin
            ld_we = 1; ld_unit = unit; ld_pe = pe; ld_addr = addr; ld_data = data;
            @(negedge clk);
            ld_we = 0;
        end
    endtask
    task cfg;
        input integer unit, pe, sel;
        input [31:0] data;
        begin
            cfg_we = 1; cfg_unit = unit; cfg_pe = pe; cfg_sel = sel; cfg_data = data;
            @(negedge clk);
            cfg_we = 0;
        end
    endtask

    // Region `unit` (an RR x CC mesh): matrix `m` of layer_w.hex at word `base`, PE (r, c)
    // holding rows [r*M/RR, (r+1)*M/RR) and blocks [c*NB/CC, (c+1)*NB/CC), as tb_mesh.v.
    integer rm, rnb, rbw, r, c, nr, nbl, rs0, bs0, k;
    task load_region;
        input integer unit, RR, CC, m, base;
        begin
            rm = WMETA[3*m]; rnb = WMETA[3*m + 1]; rbw = WMETA[3*m + 2] == 1 ? 5 : 9;
            if (rm > (1 << 11) || (rm + RR - 1) / RR > (1 << ROWS_AW) || ((rm + RR - 1) / RR) * ((rnb + CC - 1) / CC) * rbw > (1 << MEM_AW) || rnb < CC) begin
                $display("FAIL: region %0d: a %0d x %0d-block matrix does not fit a %0dx%0d mesh of this size", unit, rm, rnb, RR, CC);
                $finish;
            end
            for (r = 0; r < RR; r = r + 1)
                for (c = 0; c < CC; c = c + 1) begin
                    rs0 = (r * rm) / RR; nr = ((r + 1) * rm) / RR - rs0;
                    bs0 = (c * rnb) / CC; nbl = ((c + 1) * rnb) / CC - bs0;
                    for (i = 0; i < nr; i = i + 1)
                        for (j = 0; j < nbl; j = j + 1)
                            for (k = 0; k < rbw; k = k + 1)
                                load(unit, r * CC + c, (i * nbl + j) * rbw + k, W[base + ((rs0 + i) * rnb + bs0 + j) * rbw + k]);
                    cfg(unit, r * CC + c, 0, nr);
                    cfg(unit, r * CC + c, 1, nbl);
                    cfg(unit, r * CC + c, 2, (c == 0 ? 1 : 0) | (c == CC - 1 ? 2 : 0) | (rbw == 5 ? 4 : 0) | (terms == 2 ? 8 : 0));
                    cfg(unit, r * CC + c, 3, r == RR - 1 ? 32'b10000 : 32'b10100);
                    cfg(unit, r * CC + c, 4, (5'b10000 << 15) | (5'b00010 << 20));
                    cfg(unit, r * CC + c, 5, 5'b00010 << 20);
                    if (r == 0) cfg(unit, 16'hffff, 1, (c << 16) | (((c + 1) * rnb) / CC));
                end
            for (r = 0; r < RR; r = r + 1)
                cfg(unit, 16'hffff, 2, (r << 16) | (((r + 1) * rm) / RR - (r * rm) / RR));
            cfg(unit, 16'hffff, 0, 9 * terms);
        end
    endtask

    integer q_rows, base;
    initial begin
        errors = 0; checks = 0; t0 = 0; cyc = 0;
        for (i = 0; i < NT; i = i + 1) begin TG[i] = 0; TE[i] = 0; TF[i] = -1; TL[i] = -1; end
        if (!$value$plusargs("seed=%d", seed)) seed = 1;
        if (!$value$plusargs("stall=%d", stall_pct)) stall_pct = 0;
        $readmemh("meta.hex", META);
        $readmemh("layer_wmeta.hex", WMETA);
        n_embd = META[0]; n_head = META[1]; n_kv = META[2]; hd = META[3]; n_ff = META[4];
        pairs = META[5]; pos = META[7]; terms = META[8];
        len = pos + 1; hb = hd / 32; kvb = n_kv * hb; rw = terms * kvb * 9;
        wb = 0;
        for (u = 0; u < 7; u = u + 1) wb = wb + WMETA[3*u] * WMETA[3*u + 1] * (WMETA[3*u + 2] == 1 ? 5 : 9);
        if (wb > MAXW || len * rw > MAXC || n_embd > MAXV || n_ff > MAXV || hd > 128) begin
            $display("FAIL: the layer's shape is beyond this bench's memories");
            $finish;
        end
        $readmemh("layer_w.hex", W, 0, wb - 1);
        $readmemh("x_in.hex", X_IN, 0, n_embd - 1);
        $readmemh("attn_norm.hex", AN, 0, n_embd - 1);
        $readmemh("ffn_norm.hex", FN, 0, n_embd - 1);
        $readmemh("rope.hex", ROPE, 0, 2 * pairs - 1);
        $readmemh("k_cache.hex", KC_, 0, len * rw - 1);
        $readmemh("v_cache.hex", VC_, 0, len * rw - 1);
        TB[0] = 0;
        expect_q8(0, n_embd / 32, "attn_in.hex");
        expect_f32(1, n_head * hd, "q.hex");
        expect_f32(2, kvb * 32, "k.hex");
        expect_f32(3, kvb * 32, "v.hex");
        expect_q8(4, n_head * hb, "q_rope.hex");
        expect_q8(5, kvb, "k_rope.hex");
        expect_q8(6, kvb, "v_q8.hex");
        expect_q8(7, n_head * hb, "attn_q8.hex");
        expect_f32(8, n_embd, "o.hex");
        expect_q8(9, n_embd / 32, "ffn_in.hex");
        expect_f32(10, n_ff, "gate.hex");
        expect_f32(11, n_ff, "up.hex");
        expect_q8(12, n_ff / 32, "h.hex");
        expect_f32(13, n_embd, "down.hex");
        expect_f32(14, n_embd, "x_out.hex");
        repeat (3) @(negedge clk);
        rst = 0;
        @(negedge clk);

        // Weights: the seven regions, in layer_w.hex's order.
        base = 0;
        for (u = 0; u < 7; u = u + 1) begin
            case (u)
                0: load_region(u, QR, QC, u, base);
                1: load_region(u, KR, KC, u, base);
                2: load_region(u, VR, VC, u, base);
                3: load_region(u, OR, OC, u, base);
                4: load_region(u, GR, GC, u, base);
                5: load_region(u, GR, GC, u, base);
                default: load_region(u, DR, DC, u, base);
            endcase
            base = base + WMETA[3*u] * WMETA[3*u + 1] * (WMETA[3*u + 2] == 1 ? 5 : 9);
        end
        for (i = 0; i < n_embd; i = i + 1) load(7, 0, i, AN[i]);
        for (i = 0; i < n_embd; i = i + 1) load(7, 0, n_embd + i, FN[i]);
        for (i = 0; i < 2 * pairs; i = i + 1) load(8, 0, i, ROPE[i]);
        // The earlier positions' K and V in the attention unit's layout (flint_attn.v).
        for (j = 0; j < pos; j = j + 1)
            for (bb = 0; bb < kvb; bb = bb + 1)
                for (t = 0; t < terms; t = t + 1)
                    for (w = 0; w < 9; w = w + 1) begin
                        load(9, 0, j * rw + (bb * terms + t) * 9 + w, KC_[j * rw + (t * kvb + bb) * 9 + w]);
                        load(10, 0, j * rw + (bb * terms + t) * 9 + w, VC_[j * rw + (t * kvb + bb) * 9 + w]);
                    end
        cfg(15, 0, 0, n_embd);
        cfg(15, 0, 1, n_ff);
        cfg(15, 0, 2, n_head);
        cfg(15, 0, 3, n_kv);
        cfg(15, 0, 4, n_head / n_kv);
        cfg(15, 0, 5, hb);
        cfg(15, 0, 6, pairs);
        cfg(15, 0, 7, terms);
        cfg(15, 0, 8, pos);
        cfg(15, 0, 9, META[9]);
        cfg(15, 0, 10, META[10]);

        // The token: x_in in with random stalls, x_out out under random backpressure.
        go = 1;
        @(negedge clk);
        go = 0;
        t0 = cyc;
        nx = 0;
        while (!done && cyc - t0 < 20000000) begin
            x_valid = nx < n_embd && chance(0);
            x_data = X_IN[nx < n_embd ? nx : 0];
            y_ready = chance(0);
            #0.5;
            if (x_valid && x_ready) nx = nx + 1;
            @(negedge clk);
        end
        x_valid = 0;
        repeat (4) @(negedge clk);
        if (!done) begin
            errors = errors + 1;
            $display("FAIL: stuck after %0d cycles", cyc - t0);
        end
        for (ti = 0; ti < NT; ti = ti + 1)
            if (TG[ti] != TB[ti + 1] - TB[ti]) begin
                errors = errors + 1;
                $display("FAIL: %0s: %0d of %0d words", tname[ti], TG[ti], TB[ti + 1] - TB[ti]);
            end
        for (i = 0; i < rw; i = i + 1) begin
            checks = checks + 2;
            if (dut.attn.km[pos * rw + i] !== TX[TB[5] + i] || dut.attn.vm[pos * rw + i] !== TX[TB[6] + i]) begin
                errors = errors + 1;
                if (errors < 10) $display("FAIL: the cache's new position, word %0d", i);
            end
        end
        $display("LAYER layer=%0d pos=%0d terms=%0d n_embd=%0d n_ff=%0d heads=%0d kv=%0d hb=%0d cycles=%0d stall=%0d q=%0dx%0d k=%0dx%0d v=%0dx%0d o=%0dx%0d gate=%0dx%0d up=%0dx%0d down=%0dx%0d",
                 META[6], pos, terms, n_embd, n_ff, n_head, n_kv, hb, TL[14] + 1, stall_pct,
                 QR, QC, KR, KC, VR, VC, OR, OC, GR, GC, GR, GC, DR, DC);
        for (ti = 0; ti < NT; ti = ti + 1)
            $display("TAP name=%0s words=%0d first=%0d last=%0d", tname[ti], TG[ti], TF[ti], TL[ti]);
        $display("layer: layer %0d, position %0d, %0d term(s), stall %0d%%: %0d words checked on %0d streams, %0d cycles",
                 META[6], pos, terms, stall_pct, checks, NT, TL[14] + 1);
        if (errors == 0 && checks > 0) $display("PASS"); else $display("FAIL: %0d errors", errors);
        $finish;
    end
endmodule
