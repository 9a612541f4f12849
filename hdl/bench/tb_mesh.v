// Mesh GEMV bench: loads the golden vectors (meta.hex, weights.hex, acts.hex, expected.hex
// in the working directory), tiles the matrix over an R x C mesh (PE (r, c) holds rows
// [r*M/R, (r+1)*M/R) and blocks [c*NB/C, (c+1)*NB/C)), streams the activations in at the top
// of each column and collects the results at the east edge, with random stalls on the
// inputs and random backpressure on the outputs (+stall=PERCENT, +seed=N). Every output is
// compared to the golden f32 bits. Prints PASS or FAIL and the cycle and traffic counts.
`timescale 1ns/1ps
module tb_mesh;
    parameter R = 2;
    parameter C = 2;
    parameter MEM_AW = 14;
    parameter ROWS_AW = 8;
    parameter ACT_AW = 9;
    localparam NC = 3;

    reg clk = 0;
    always #1 clk = ~clk;
    reg rst = 1;

    reg [31:0] meta [0:4];
    reg [31:0] W [0:524287];
    reg [31:0] A [0:16383];
    reg [31:0] Y [0:16383];
    integer M, NB, BW, seed, stall_pct, errors, cycles, t0;

    reg go = 0, ld_we = 0, cfg_we = 0;
    reg [15:0] ld_pe = 0, cfg_pe = 0;
    reg [MEM_AW-1:0] ld_addr = 0;
    reg [31:0] ld_data = 0, cfg_data = 0;
    reg [3:0] cfg_sel = 0;
    reg [C-1:0] n_valid = 0;
    reg [C*32-1:0] n_data = 0;
    wire [C*NC-1:0] n_ready;
    wire [R-1:0] e_valid;
    wire [R*2-1:0] e_colour;
    wire [R*32-1:0] e_data;
    reg [R*NC-1:0] e_ready = 0;
    wire done;
    wire [31:0] tot_mac, tot_cycles, tot_stall;
    wire [NC*32-1:0] tot_xfer;

    flint_mesh #(.R(R), .C(C), .NC(NC), .MEM_AW(MEM_AW), .ROWS_AW(ROWS_AW), .ACT_AW(ACT_AW)) dut (
        .clk(clk), .rst(rst), .go(go),
        .ld_we(ld_we), .ld_pe(ld_pe), .ld_addr(ld_addr), .ld_data(ld_data),
        .cfg_we(cfg_we), .cfg_pe(cfg_pe), .cfg_sel(cfg_sel), .cfg_data(cfg_data),
        .n_valid(n_valid), .n_colour({C{2'd0}}), .n_data(n_data), .n_ready(n_ready),
        .e_valid(e_valid), .e_colour(e_colour), .e_data(e_data), .e_ready(e_ready),
        .done(done), .tot_mac(tot_mac), .tot_cycles(tot_cycles), .tot_xfer(tot_xfer), .tot_stall(tot_stall)
    );

    function integer rs;  // first matrix row of mesh row r
        input integer r;
        rs = (r * M) / R;
    endfunction
    function integer bs;  // first block of mesh column c
        input integer c;
        bs = (c * NB) / C;
    endfunction

    task cfg;
        input integer pe, sel, data;
        begin
            @(negedge clk);
            cfg_we = 1; cfg_pe = pe; cfg_sel = sel; cfg_data = data;
            @(negedge clk);
            cfg_we = 0;
        end
    endtask

    integer r, c, i, j, k, nr, nbl, running;
    reg [31:0] route0;
    initial begin
        $readmemh("meta.hex", meta);
        M = meta[0];
        NB = meta[1];
        BW = meta[4] == 1 ? 5 : 9; // words a weight block: Q4_1 or Q8_0
        $readmemh("weights.hex", W, 0, M * NB * BW - 1);
        $readmemh("acts.hex", A, 0, NB * 9 - 1);
        $readmemh("expected.hex", Y, 0, M - 1);
        if (!$value$plusargs("seed=%d", seed)) seed = 1;
        if (!$value$plusargs("stall=%d", stall_pct)) stall_pct = 0;
        if ((M + R - 1) / R > (1 << ROWS_AW) || ((NB + C - 1) / C) * 9 > (1 << ACT_AW) || ((M + R - 1) / R) * ((NB + C - 1) / C) * BW > (1 << MEM_AW)) begin
            $display("FAIL: a %0d x %0d-block matrix does not fit a %0dx%0d mesh of this size", M, NB, R, C);
            $finish;
        end
        repeat (4) @(posedge clk);
        rst = 0;
        // Load each PE's tile and configuration.
        for (r = 0; r < R; r = r + 1)
            for (c = 0; c < C; c = c + 1) begin
                nr = rs(r + 1) - rs(r);
                nbl = bs(c + 1) - bs(c);
                for (i = 0; i < nr; i = i + 1)
                    for (j = 0; j < nbl; j = j + 1)
                        for (k = 0; k < BW; k = k + 1) begin
                            @(negedge clk);
                            ld_we = 1;
                            ld_pe = r * C + c;
                            ld_addr = (i * nbl + j) * BW + k;
                            ld_data = W[((rs(r) + i) * NB + bs(c) + j) * BW + k];
                        end
                @(negedge clk);
                ld_we = 0;
                cfg(r * C + c, 0, nr);
                cfg(r * C + c, 1, nbl);
                cfg(r * C + c, 2, (c == 0 ? 1 : 0) | (c == C - 1 ? 2 : 0) | (BW == 5 ? 4 : 0));
                // Colour 0 (activations): north -> south and local (local only in the last row).
                route0 = (r == R - 1) ? 32'b10000 : 32'b10100;
                cfg(r * C + c, 3, route0);
                // Colour 1 (partial sums): west -> local, local -> east.
                cfg(r * C + c, 4, (5'b10000 << 15) | (5'b00010 << 20));
                // Colour 2 (results): local -> east.
                cfg(r * C + c, 5, 5'b00010 << 20);
            end
        @(negedge clk);
        go = 1;
        @(negedge clk);
        go = 0;
        t0 = cycles;
    end

    always @(posedge clk) cycles <= rst ? 0 : cycles + 1;

    // Activation injection, per column, with random stalls.
    integer sent [0:C-1];
    integer got [0:R-1];
    genvar gc, gr;
    generate
        for (gc = 0; gc < C; gc = gc + 1) begin : g_inj
            initial sent[gc] = 0;
            always @(posedge clk) begin
                if (n_valid[gc] && n_ready[gc*NC])
                    sent[gc] <= sent[gc] + 1;
            end
            always @(negedge clk) begin
                if (t0 > 0 && sent[gc] < (bs(gc + 1) - bs(gc)) * 9 && ($unsigned($random(seed)) % 100) >= stall_pct) begin
                    n_valid[gc] = 1;
                    n_data[gc*32 +: 32] = A[bs(gc) * 9 + sent[gc]];
                end else begin
                    n_valid[gc] = 0;
                end
            end
        end
        for (gr = 0; gr < R; gr = gr + 1) begin : g_col
            initial got[gr] = 0;
            always @(negedge clk)
                e_ready[gr*NC +: NC] = (($unsigned($random(seed)) % 100) >= stall_pct) ? {NC{1'b1}} : {NC{1'b0}};
            always @(posedge clk) begin
                if (e_valid[gr] && e_ready[gr*NC + e_colour[gr*2 +: 2]]) begin
                    if (e_colour[gr*2 +: 2] != 2 || got[gr] >= rs(gr + 1) - rs(gr)) begin
                        errors = errors + 1;
                        $display("FAIL: unexpected flit on row %0d's east edge: colour %0d data %h", gr, e_colour[gr*2 +: 2], e_data[gr*32 +: 32]);
                    end else if (e_data[gr*32 +: 32] !== Y[rs(gr) + got[gr]]) begin
                        errors = errors + 1;
                        if (errors < 10)
                            $display("FAIL: row %0d: %h, expected %h", rs(gr) + got[gr], e_data[gr*32 +: 32], Y[rs(gr) + got[gr]]);
                    end
                    got[gr] <= got[gr] + 1;
                end
            end
        end
    endgenerate

    integer all, links;
    initial begin
        errors = 0;
        t0 = 0;
        cycles = 0;
        wait (t0 > 0);
        while (1) begin
            @(posedge clk);
            all = 1;
            for (r = 0; r < R; r = r + 1)
                if (got[r] < rs(r + 1) - rs(r)) all = 0;
            if (all && done) begin
                repeat (4) @(posedge clk);
                // Router output links: directed links between PEs plus the east edge's.
                links = 2 * (R * (C - 1) + C * (R - 1)) + R;
                $display("mesh %0dx%0d gemv %0dx%0d (%0s weights): cycles %0d, mac cycles %0d (PE utilization %0.3f), flits c0 %0d c1 %0d c2 %0d (link utilization %0.4f %0.4f %0.4f), stall cycles %0d",
                    R, C, M, NB * 32, BW == 5 ? "Q4_1" : "Q8_0", tot_cycles, tot_mac, tot_mac * 1.0 / (tot_cycles * R * C),
                    tot_xfer[31:0], tot_xfer[63:32], tot_xfer[95:64],
                    tot_xfer[31:0] * 1.0 / (links * tot_cycles), tot_xfer[63:32] * 1.0 / (links * tot_cycles), tot_xfer[95:64] * 1.0 / (links * tot_cycles),
                    tot_stall);
                $display("STATS R=%0d C=%0d M=%0d NB=%0d BW=%0d cycles=%0d mac=%0d x0=%0d x1=%0d x2=%0d stall=%0d", R, C, M, NB, BW, tot_cycles, tot_mac, tot_xfer[31:0], tot_xfer[63:32], tot_xfer[95:64], tot_stall);
                if (errors == 0) $display("PASS");
                else $display("FAIL: %0d mismatches", errors);
                $finish;
            end
            if (cycles - t0 > 200000) begin
                $display("FAIL: timeout");
                $finish;
            end
        end
    end
endmodule
