// Train Tools: the WebUI's own progress bar for a training run (the textual-inversion tab's pattern),
// plus a refresh of the loss plot and the file list every few seconds while it runs.

function train_tools_start() {
    var id = randomId();
    var lastRefresh = 0;
    var refresh = function() {
        var button = gradioApp().getElementById('train_tools_refresh');
        if (button) button.click();
    };
    // #train_tools_progress belongs to this script, never to a gradio event: writing into an element that a
    // gradio event updates would detach the element gradio renders into.
    requestProgress(id, gradioApp().getElementById('train_tools_progress'), null, refresh, function(progress) {
        gradioApp().getElementById('train_tools_progress').innerHTML = progress.textinfo || '';
        var now = Date.now();
        if (now - lastRefresh > 3000) {
            lastRefresh = now;
            refresh();
        }
    });

    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

// Preview grid: the WebUI's progress bar while the grid renders (its own element, never a gradio output).
function train_tools_grid_progress(id) {
    var box = gradioApp().getElementById('train_tools_grid_progress');
    requestProgress(id, box, null, function() {}, function(progress) {
        box.innerHTML = progress.textinfo || '';
    });
}

function train_tools_grid_start() {
    var res = Array.from(arguments);
    res[0] = randomId();
    train_tools_grid_progress(res[0]);
    return res;
}

// After a training, when "Generate after training" (the second input) is ticked.
function train_tools_grid_after_training() {
    var res = Array.from(arguments);
    res[0] = randomId();
    if (res[1]) train_tools_grid_progress(res[0]);
    return res;
}

// Dataset page: the WebUI's progress bar while pictures are tagged, only when the tagger check passed (the
// second input); #train_tools_ds_progress is written here only, never by a gradio event.
function train_tools_ds_tag_start() {
    var res = Array.from(arguments);
    res[0] = randomId();
    if (res[1]) {
        var box = gradioApp().getElementById('train_tools_ds_progress');
        requestProgress(res[0], box, null, function() {
            box.innerHTML = '';
        }, function(progress) {
            box.innerHTML = progress.textinfo || '';
        });
    }
    return res;
}

// Dataset page: "Prepare for training" opens the Train page and presses its Prepare button, so the encoding
// uses that page's settings (size, buckets, flip) and shows its progress bar there.
function train_tools_ds_prepare() {
    // The second page is Train (its title may be translated; gradio 3 gives the tab buttons no id).
    var pages = gradioApp().querySelectorAll('#train_tools_pages > .tab-nav > button');
    if (pages.length > 1) pages[1].click();
    setTimeout(function() {
        gradioApp().getElementById('train_tools_prepare').click();
    }, 300);
    return [];
}
